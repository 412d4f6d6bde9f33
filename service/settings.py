"""The server's one settings class: every `PIGGYBACK_*` environment variable, validated at start.

Besides the class: what `python -m service` checks before it starts, so that a configuration no retry
can fix (an unknown backbone, a missing weights file, cuda without CUDA, a host that does not resolve)
ends the process with one line naming the variable instead of a replica that stays unready for good.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024
ENV_PREFIX = "PIGGYBACK_"
# what `make demo` (training/demo.py) writes: `python -m service` run from a checkout serves the demo
DEMO_WEIGHTS = ".cache/demo/mobilenet_v2-b0353104.pth"
DEMO_STORE = ".cache/demo/store"
SIZE_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": MIB, "gib": 1024 * MIB, "tib": 1024 * 1024 * MIB}
SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def byte_size(value: object) -> object:
    """`8388608`, `8MiB`, `8 MiB`, `512 KiB`, `1GiB` -> bytes. Binary units only: `MB` is refused rather
    than guessed (10^6 or 2^20?)."""
    if not isinstance(value, str):
        return value
    match = SIZE.fullmatch(value)
    unit = match.group(2).lower() if match else None
    if unit not in SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size: write bytes (8388608) or a binary unit (8 MiB, 512 KiB, 1 GiB)")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


ByteSize = Annotated[int, BeforeValidator(byte_size)]


class ConfigurationError(Exception):
    """A setting that no retry can fix. The message is one line and names the `PIGGYBACK_*` variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True)

    backbone: str = Field("mobilenet_v2", description="torchvision architecture of the shared backbone")
    weights: str | None = Field(
        DEMO_WEIGHTS,
        description="backbone state_dict file, or a torchvision weights name (downloads: needs internet); "
        "empty = random initialisation (tests and benchmarks only)",
    )
    store: str = Field(DEMO_STORE, description="task store: a directory or s3://bucket/prefix")
    store_poll_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="how often the store is checked for changes made by other replicas (seconds)",
    )
    admin_token: SecretStr | None = Field(None, description="bearer token for /admin; unset disables admin")
    host: str = Field("127.0.0.1", description="listen address (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="listen port")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the backbone runs; auto = cuda if any")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="backbone dtype on device")
    kernel: Literal["auto", "torch", "cpu", "triton"] = Field("auto", description="mask-apply implementation")
    cache_budget_mb: float = Field(1024, ge=0, description="materialized task weights kept; 0 = apply per request")
    resident_budget_mb: float = Field(
        2048,
        gt=0,
        allow_inf_nan=False,
        description="device memory for resident tasks (masks, BN, heads); least recently used ones are unloaded",
    )
    host_budget_mb: float = Field(
        512,
        ge=0,
        allow_inf_nan=False,
        description="host memory for verified artifacts of recently used tasks, so a task unloaded from the device "
        "loads again without a store read; 0 = none",
    )
    preload: Literal["all", "pinned"] = Field(
        "all",
        description="tasks loaded before use: every one (within the resident budget), or only PIGGYBACK_PINNED_TASKS; "
        "the others load on their first request",
    )
    preload_recent: int = Field(
        64,
        ge=0,
        description="tasks loaded at start-up from the store's record of the most recently used ones (within the "
        "resident budget), so a restart meets no cold storm; 0 = none",
    )
    pinned_tasks: str = Field("", description="comma-separated task names always kept resident, loaded at start-up")
    torch_threads: int = Field(
        0, ge=0, description="CPU threads per forward; 0 = torch's default (OMP_NUM_THREADS, else every core)"
    )
    max_batch_size: int = Field(32, ge=1, description="images per forward pass")
    mixed_batches: Literal["auto", "always", "off"] = Field(
        "auto",
        description="images of different tasks in one forward: where the start-up cost model measured it faster "
        "(auto), whenever several tasks wait (always), or never (off)",
    )
    mixed_budget_mb: float = Field(
        256,
        ge=0,
        allow_inf_nan=False,
        description="memory for a mixed batch's stacked task weights, allocated once; it bounds the images per "
        "mixed forward (about one backbone's weights each)",
    )
    max_batch_delay_ms: float = Field(5.0, ge=0, description="how long a request may wait for batch-mates")
    max_concurrent_predictions: int = Field(
        64, ge=1, description="prediction requests inside the server at once; more get 503 before their body is read"
    )
    max_queued_images: int | None = Field(
        None, ge=1, description="images waiting for the engine before new ones get 503; unset = 4 x max_batch_size"
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        allow_inf_nan=False,
        description="deadline of a prediction; a client may ask for less with X-Request-Timeout",
    )
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        allow_inf_nan=False,
        description="how long a request body may take to arrive, from the request's arrival; past it 408 "
        "(authenticated /admin uploads excepted)",
    )
    drain_s: float = Field(
        30.0, ge=0, allow_inf_nan=False, description="on SIGTERM, how long queued and in-flight predictions may finish"
    )
    max_images_per_request: int = Field(16, ge=1, description="images in one prediction request")
    max_image_bytes: ByteSize = Field(8 * MIB, ge=1, description="one uploaded image (bytes, or 8 MiB, 512 KiB...)")
    max_image_pixels: int = Field(25_000_000, ge=1, description="decompression-bomb guard (width * height)")
    max_request_bytes: ByteSize = Field(64 * MIB, ge=1, description="one request body (bytes, or 64 MiB...)")
    max_artifact_bytes: ByteSize = Field(1024 * MIB, ge=1, description="one task artifact upload (bytes, or 1 GiB)")
    replica_id: str | None = Field(None, description="name sent in X-Piggyback-Replica; default hostname-pid")
    # Ray Serve only (`service/ray_serve.py`); `python -m service` ignores them.
    ray_max_ongoing_requests: int = Field(8, ge=1, description="requests one replica works on at once")
    ray_max_queued_requests: int = Field(64, ge=1, description="requests waiting for a replica; beyond: 503")
    ray_router_max_inflight: int = Field(
        256, ge=1, description="requests the Ray router holds at once (bodies included); beyond: 503 from the headers"
    )
    ray_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved by each model replica")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="log level of the server and uvicorn"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, level: object) -> object:
        return level.strip().lower() if isinstance(level, str) else level

    @field_validator("weights", mode="before")
    @classmethod
    def _empty_weights_is_random(cls, weights: object) -> object:
        if isinstance(weights, Path):
            return str(weights)
        return None if isinstance(weights, str) and not weights.strip() else weights

    @field_validator("store", mode="before")
    @classmethod
    def _store_location_text(cls, location: str | Path) -> str:
        return str(location)

    @field_validator("admin_token")
    @classmethod
    def _token_strong_enough(cls, token: SecretStr | None) -> SecretStr | None:
        # Stripped: a token read from a secret file ends in a newline that no client ever sends.
        value = token.get_secret_value().strip() if token is not None else ""
        if not value:
            return None  # unset or empty: admin routes disabled
        if len(value) < 16:
            raise ValueError("PIGGYBACK_ADMIN_TOKEN must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        return SecretStr(value)

    def pinned(self) -> frozenset[str]:
        return frozenset(name.strip() for name in self.pinned_tasks.split(",") if name.strip())

    def queue_bound(self) -> int:
        """Images allowed to wait: by default four full batches, enough to keep the engine busy."""
        return self.max_queued_images if self.max_queued_images is not None else 4 * self.max_batch_size

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("PIGGYBACK_DEVICE=cuda, but torch sees no CUDA device; set PIGGYBACK_DEVICE=auto or cpu")
        return self.device


def env_name(field: str) -> str:
    """The environment variable of a settings field: `store_poll_s` -> `PIGGYBACK_STORE_POLL_S`."""
    return f"{ENV_PREFIX}{field.upper()}"


def settings_error_lines(error: ValidationError) -> list[str]:
    """One line per refused variable, named as the user wrote it (the field name too, for code readers).
    The admin token's value is never echoed."""
    lines = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        given = problem.get("input")
        shown = f"={given!r}" if isinstance(given, str | int | float) and field != "admin_token" else ""
        reason = problem["msg"].removeprefix("Value error, ")
        lines.append(f"invalid setting {env_name(field)}{shown}: {reason} (setting {field})")
    return lines


def check_before_start(settings: Settings) -> None:
    """Raise ConfigurationError for what no retry can fix, before the server binds a port or says ready:
    the host, the device and mask kernel, the backbone architecture, the weights, the store's location.

    A store that does not answer (unreachable, a missing bucket, refused credentials) is not one of these:
    start-up retries it with backoff and `/readyz` says why (`service.app`). Weights that exist but cannot
    be loaded are found when the backbone loads (`backbone_load_problem`).

    The checks that need no torch come first: such a refusal answers in a fraction of a second, not in
    the seconds that importing torch and torchvision takes."""
    _check_host(settings)
    _check_store(settings)
    _check_weights_file(settings)
    device = _check_device(settings)
    _check_kernel(settings, device)
    _check_backbone(settings)
    _check_weights_name(settings)


def backbone_load_problem(settings: Settings, exc: BaseException) -> str:
    """One line for a backbone that the settings cannot build, naming the variable to fix."""
    from mask_store.errors import BackboneMismatch, UnsupportedArchitecture

    detail = " ".join(str(exc).split()) or type(exc).__name__
    if len(detail) > 400:
        detail = detail[:400] + "..."
    weights, backbone = f"{env_name('weights')}={settings.weights}", f"{env_name('backbone')}={settings.backbone}"
    if isinstance(exc, BackboneMismatch):  # the file is another architecture's (or not a state_dict at all)
        return f"{weights} does not fit {backbone}: {detail}"
    if isinstance(exc, UnsupportedArchitecture) and settings.weights and str(settings.weights) not in detail:
        return f"{backbone}: {detail}"
    if "PIGGYBACK_" in detail:  # the message already names its variable
        return detail
    return f"{weights}: {detail}"


def _check_host(settings: Settings) -> None:
    import socket

    try:
        socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigurationError(
            f"{env_name('host')}={settings.host} does not resolve ({reason}); use an address such as 127.0.0.1 "
            "or 0.0.0.0, or a name this machine resolves"
        ) from None


def _check_device(settings: Settings) -> str:
    try:
        return settings.resolved_device()
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


def _check_kernel(settings: Settings, device: str) -> None:
    import torch

    from service.kernels.select import select_mask_apply

    try:
        select_mask_apply(torch.device(device), settings.kernel)
    except ValueError as exc:
        raise ConfigurationError(f"{env_name('kernel')}={settings.kernel}: {exc}") from None


def _check_backbone(settings: Settings) -> None:
    from mask_store.architectures import check_architecture
    from mask_store.errors import UnsupportedArchitecture

    try:
        check_architecture(settings.backbone)
    except UnsupportedArchitecture as exc:
        raise ConfigurationError(f"{env_name('backbone')}={settings.backbone}: {exc}") from None


def _check_weights_file(settings: Settings) -> None:
    """The same readings as `mask_store.build_backbone`: a file that exists (it must be readable), else an
    upper-case torchvision weights name (`_check_weights_name`, once the backbone is known), else a file
    that is missing."""
    name = env_name("weights")
    weights = settings.weights
    if weights is None:
        return
    path = Path(weights)
    if path.exists():
        try:
            with path.open("rb") as f:
                f.read(1)
        except OSError as exc:
            raise ConfigurationError(f"{name}={weights} cannot be read ({exc.strerror or exc})") from None
        return
    if weights.isupper():
        return
    hint = "; `make demo` writes it" if weights == DEMO_WEIGHTS else ""
    raise ConfigurationError(
        f"{name}={weights}: no such file{hint}; set {name} to a state_dict file, or a torchvision weights "
        "name such as IMAGENET1K_V1 (downloads: needs internet)"
    )


def _check_weights_name(settings: Settings) -> None:
    """An upper-case PIGGYBACK_WEIGHTS that is no file must be one of the backbone's torchvision names."""
    name = env_name("weights")
    weights = settings.weights
    if weights is None or not weights.isupper() or Path(weights).exists():
        return
    import torchvision

    try:
        torchvision.models.get_model_weights(settings.backbone).verify(weights)
    except (KeyError, ValueError):
        known = ", ".join(w.name for w in torchvision.models.get_model_weights(settings.backbone))
        raise ConfigurationError(
            f"{name}={weights} is not a torchvision weights name of {settings.backbone} (known: {known}) "
            "and no such file exists"
        ) from None


def _check_store(settings: Settings) -> None:
    import importlib.util
    from urllib.parse import urlparse

    name, store = env_name("store"), settings.store
    if store.startswith("s3://"):
        if not urlparse(store).netloc:
            raise ConfigurationError(f"{name}={store} names no bucket; write s3://bucket/prefix")
        if importlib.util.find_spec("boto3") is None:
            raise ConfigurationError(f"{name}={store} needs the S3 backend: pip install 'piggyback-serve[s3]'")
    elif Path(store).exists() and not Path(store).is_dir():
        raise ConfigurationError(f"{name}={store} is not a directory")
