"""Errors with messages a user can act on. All derive from ``ValueError`` so callers can catch broadly."""


class HyperNetError(ValueError):
    """Base class for every error this package raises about bad input."""


class TargetMismatchError(HyperNetError):
    """A file or LoRA was made for other layers than the model in hand has."""


class FileFormatError(HyperNetError):
    """A file is missing, corrupt, of the wrong kind, or of an unsupported version."""


class FeatureError(HyperNetError):
    """Image features have the wrong shape or contain NaN/inf."""
