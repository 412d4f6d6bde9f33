"""The server's one settings class: every `PIGGYBACK_*` environment variable, validated at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PIGGYBACK_", frozen=True)

    backbone: str = Field("resnet18", description="torchvision architecture of the shared backbone")
    weights: str | None = Field(None, description="backbone state_dict file, or a torchvision weights name")
    store: str = Field(".cache/demo/store", description="task store: a directory or s3://bucket/prefix")
    store_poll_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="how often the store is checked for changes made by other replicas (seconds)",
    )
    admin_token: SecretStr | None = Field(None, description="bearer token for /admin; unset disables admin")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="backbone dtype on device")
    kernel: Literal["auto", "torch", "cpu", "triton"] = Field("auto", description="mask-apply implementation")
    cache_budget_mb: float = Field(1024, ge=0, description="materialized task weights kept; 0 = apply per request")
    resident_budget_mb: float = Field(
        2048,
        gt=0,
        allow_inf_nan=False,
        description="device memory for resident tasks (masks, BN, heads); least recently used ones are unloaded",
    )
    preload: Literal["all", "pinned"] = Field(
        "all",
        description="tasks loaded before use: every one (within the resident budget), or only PIGGYBACK_PINNED_TASKS; "
        "the others load on their first request",
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
    max_images_per_request: int = Field(16, ge=1)
    max_image_bytes: int = Field(8 * MIB, ge=1)
    max_image_pixels: int = Field(25_000_000, ge=1, description="decompression-bomb guard (width * height)")
    max_request_bytes: int = Field(64 * MIB, ge=1)
    max_artifact_bytes: int = Field(1024 * MIB, ge=1)
    replica_id: str | None = Field(None, description="name sent in X-Piggyback-Replica; default hostname-pid")
    # Ray Serve only (`service/ray_serve.py`); `python -m service` ignores them.
    ray_max_ongoing_requests: int = Field(8, ge=1, description="requests one replica works on at once")
    ray_max_queued_requests: int = Field(64, ge=1, description="requests waiting for a replica; beyond: 503")
    ray_router_max_inflight: int = Field(
        256, ge=1, description="requests the Ray router holds at once (bodies included); beyond: 503 from the headers"
    )
    ray_tasks_per_replica: int = Field(20, ge=1, description="tasks a replica keeps hot for task routing")
    ray_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved by each model replica")
    log_level: str = "info"

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
            raise ValueError("PIGGYBACK_DEVICE=cuda but no CUDA device is available")
        return self.device
