"""Errors with messages a user can act on. All derive from ``ValueError`` so callers can catch broadly."""


class HyperNetError(ValueError):
    """Base class for every error this package raises about bad input."""


class TargetMismatchError(HyperNetError):
    """A file or LoRA was made for other layers than the model in hand has."""


class FileFormatError(HyperNetError):
    """A file is missing, corrupt, of the wrong kind, or of an unsupported version."""


class FeatureError(HyperNetError):
    """Image features have the wrong shape or contain NaN/inf."""


def require_int(name: str, value, minimum: int | None = None) -> None:
    """``value`` is an integer (not a bool) of at least ``minimum``; the error names the field."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise HyperNetError(f"{name} must be an integer, not {value!r}")
    if minimum is not None and value < minimum:
        raise HyperNetError(f"{name} must be >= {minimum}, not {value}")


def require_number(name: str, value, low: float, high: float, *, high_inclusive: bool = True, low_inclusive: bool = True) -> None:
    """``value`` is a finite real number in the stated range; the error names the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
        raise HyperNetError(f"{name} must be a finite number, not {value!r}")
    if value < low or value > high or (value == low and not low_inclusive) or (value == high and not high_inclusive):
        interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
        raise HyperNetError(f"{name} must be in {interval}, not {value}")
