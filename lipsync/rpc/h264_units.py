"""H.264 Annex B access units as they travel in `StreamFrame.h264` (docs/DELIVERY.md):
split into NAL units, tell their types. Pure Python: the service, the client's muxer and
the tests share it, and none of them needs a decoder for it."""

from __future__ import annotations

import re

__all__ = [
    "NAL_IDR",
    "NAL_PPS",
    "NAL_SLICE",
    "NAL_SPS",
    "annexb",
    "is_idr",
    "nal_type",
    "nal_types",
    "nal_units",
    "parameter_sets",
]

NAL_SLICE = 1  # a coded slice of a non-IDR picture
NAL_IDR = 5  # a coded slice of an IDR picture
NAL_SPS = 7
NAL_PPS = 8

# A start code: 00 00 01, or 00 00 00 01 (the leading zero then ends the previous unit's
# trailing zeros, which Annex B allows and which belong to no unit).
_START = re.compile(rb"\x00\x00\x01")


def nal_units(au: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte string (start codes and trailing zeros removed).
    Raises ValueError when it does not begin with a start code."""
    starts = [m.end() for m in _START.finditer(au)]
    if not starts or au[: starts[0] - 3].strip(b"\x00"):
        raise ValueError("not an Annex B byte stream (no start code first)")
    ends = [s - 3 for s in starts[1:]] + [len(au)]
    return [au[a:b].rstrip(b"\x00") for a, b in zip(starts, ends, strict=True)]


def nal_type(unit: bytes) -> int:
    """nal_unit_type: the low five bits of the unit's first byte."""
    return unit[0] & 0x1F


def nal_types(au: bytes) -> list[int]:
    return [nal_type(u) for u in nal_units(au) if u]


def is_idr(au: bytes) -> bool:
    """The access unit holds an IDR picture."""
    return NAL_IDR in nal_types(au)


def parameter_sets(au: bytes) -> list[bytes]:
    """The SPS and PPS units of an access unit, in order."""
    return [u for u in nal_units(au) if u and nal_type(u) in (NAL_SPS, NAL_PPS)]


def annexb(units: list[bytes]) -> bytes:
    """NAL units back into an Annex B byte string (four-byte start codes)."""
    return b"".join(b"\x00\x00\x00\x01" + u for u in units)
