"""Safetensors files with a chosen header length, to test readers against every first byte a valid file can have.

A safetensors file starts with its JSON header's length as a little-endian u64, so its first byte is the
length's low byte: 0x80 (a pickle's first byte) for lengths 128, 384, ..., and "PK" (a zip's) for 19280.
The spec allows the header to be padded with spaces, so any length above the JSON's own is a valid file.
"""

from __future__ import annotations

from pathlib import Path

PK_LENGTH = int.from_bytes(b"PK", "little")  # 19280: a header this long makes the file start with "PK"


def header_length(path: str | Path) -> int:
    with open(path, "rb") as handle:
        return int.from_bytes(handle.read(8), "little")


def with_header_length(source: str | Path, dest: str | Path, length: int) -> Path:
    """A copy of ``source`` whose header is padded with spaces to exactly ``length`` bytes."""
    data = Path(source).read_bytes()
    old = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + old].rstrip(b" ")
    if length < len(header):
        raise ValueError(f"header of {source} is {len(header)} bytes, cannot shrink it to {length}")
    Path(dest).write_bytes(length.to_bytes(8, "little") + header + b" " * (length - len(header)) + data[8 + old :])
    return Path(dest)


def _json_length(source: str | Path) -> int:
    data = Path(source).read_bytes()
    return len(data[8 : 8 + int.from_bytes(data[:8], "little")].rstrip(b" "))


def _at_least(minimum: int, value: int, modulus: int) -> int:
    """The smallest length >= minimum that is ``value`` modulo ``modulus`` (its low bytes spell ``value``)."""
    return minimum + (value - minimum) % modulus


def lengths_with_every_low_byte(source: str | Path, step: int = 1) -> list[int]:
    """Header lengths >= the file's own JSON whose low byte runs through 0..255 (every ``step``-th), plus
    the ones that make the file start with 0x80 and with "PK"."""
    minimum = _json_length(source)
    lengths = {_at_least(minimum, low, 256) for low in range(0, 256, step)}
    return sorted(lengths | {_at_least(minimum, 0x80, 256), _at_least(minimum, PK_LENGTH, 65536)})


def first_bytes_cases(source: str | Path) -> list[int]:
    """A few header lengths, most telling first: the file starts like a pickle (0x80), like a zip ("PK"),
    like a pickle again (another length), or with an odd (unaligned) length."""
    minimum = _json_length(source)
    pickle_like = _at_least(minimum, 0x80, 256)
    return [pickle_like, _at_least(minimum, PK_LENGTH, 65536), pickle_like + 256, _at_least(minimum, 1, 2)]
