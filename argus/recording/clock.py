"""The one conversion from node CLOCK_MONOTONIC nanoseconds to wall-clock nanoseconds.

Every module that shows or compares times across nodes goes through `mono_to_wall`, so the
rule lives in one place: `wall_ns = ts_ns + manifest["clock"]["mono_to_wall_ns"]`.
"""

from __future__ import annotations

from typing import Any, TypeVar

import polars as pl

from argus.errors import RecordingInvalid

T = TypeVar("T", int, pl.Expr, pl.Series)


def mono_to_wall_offset(manifest: dict[str, Any]) -> int:
    """The offset (ns) to add to a monotonic timestamp of this recording to get wall time."""
    clock = manifest.get("clock")
    if not isinstance(clock, dict) or not isinstance(clock.get("mono_to_wall_ns"), int):
        raise RecordingInvalid(
            "The manifest has no integer clock.mono_to_wall_ns, so its times cannot be converted."
        )
    return int(clock["mono_to_wall_ns"])


def mono_to_wall(ts_ns: T, manifest: dict[str, Any]) -> T:
    """Convert node-monotonic `ts_ns` (an int, a polars Series or Expr) to wall-clock ns.

    The recording's manifest holds the offset sampled when tracing started
    (`clock.mono_to_wall_ns`); wall = monotonic + offset. Null stays null.
    """
    offset = mono_to_wall_offset(manifest)
    if ts_ns is None:
        return None  # type: ignore[return-value]
    return ts_ns + offset
