"""Domain errors of the mask store. The service maps each to one HTTP status, in one place."""


class MaskStoreError(Exception):
    """Base class: every refusal of the store or artifact reader is one of these."""


class TaskNotFound(MaskStoreError):
    """No task (or no such version) of that name is stored."""


class CorruptArtifact(MaskStoreError):
    """The artifact is truncated, garbage, fails a checksum, or contradicts its own manifest."""


class BackboneMismatch(MaskStoreError):
    """The artifact was learned over another backbone (fingerprint, arch or layer shapes differ)."""


class UnsupportedArchitecture(MaskStoreError):
    """The model has no layers Piggyback can mask, no recognisable classifier head, or no such arch."""


class UnsupportedImage(MaskStoreError):
    """An image whose pixels cannot be brought to 8-bit L/RGB faithfully (the service answers 415)."""


class CorruptWeights(MaskStoreError):
    """A backbone weights file whose sha256 does not match the hash prefix in its torchvision-style name."""


class WeightsUnavailable(MaskStoreError):
    """Backbone weights named the torchvision way (IMAGENET1K_V2) that are no such weights, or that could not
    be downloaded (no internet): say so, rather than a bare network error."""
