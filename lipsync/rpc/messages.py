"""Protocol values to the names the domain code uses, in one place for both services."""

from __future__ import annotations

from lipsync.proto import common_pb2 as common

AUDIO_ENCODINGS = {common.PCM_F32LE: "f32le", common.PCM_S16LE: "s16le"}


def audio_encoding(value: int) -> str:
    """The PCM encoding name ("f32le" / "s16le") of an `AudioEncoding` value; ValueError
    for a value this version does not know."""
    try:
        return AUDIO_ENCODINGS[value]
    except KeyError:
        raise ValueError(f"unknown audio_encoding {value}") from None


def audio_encoding_value(name: str) -> int:
    """The `AudioEncoding` value of "f32le" / "s16le"."""
    for value, n in AUDIO_ENCODINGS.items():
        if n == name:
            return value
    raise ValueError(f"unknown audio encoding {name!r}")
