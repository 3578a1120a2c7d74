"""The diagnosis of one job: the one entry point over recordings or their summaries.

`diagnose(source)` takes raw recordings (one per node) or summaries (one per node, e.g.
`compress.build_summaries` or `recording.summaries.load_summaries`), builds what the
detectors read (`evidence.from_recordings` or `evidence.from_summaries`, both opened by
`evidence.align_recordings`) and runs every detector on it (`report.assemble_report`):
an `argus.report/1` dict, the same findings on either path.

`diagnose_dirs(dirs)` is what the commands call for recorded directories: a daemon's output,
its job directories and segments are expanded (`recording.segments.expand_dirs`), and the
directories are diagnosed from their raw events, or from their summaries when asked or when
one has summaries and no events (summaries built from the events where a DIR has none; one
node's segments merged, step ids aligned across nodes: `merge.merge_nodes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from argus.analyze import evidence
from argus.analyze.compress import build_summaries
from argus.analyze.merge import merge_nodes
from argus.analyze.report import DEFAULT_HANG_AFTER_S, assemble_report
from argus.recording.io import Recording, load_recording
from argus.recording.segments import expand_dirs
from argus.recording.summaries import Summaries, has_events, has_summaries, load_summaries

__all__ = ["DEFAULT_HANG_AFTER_S", "diagnose", "diagnose_dirs"]


def diagnose(
    source: Recording | Summaries | Sequence[Recording] | Sequence[Summaries],
    hang_after_s: float = DEFAULT_HANG_AFTER_S,
    *,
    upto_step: int | None = None,
    with_tail: bool = True,
) -> dict[str, Any]:
    """The argus.report/1 object of one job from its recordings or its summaries (one per
    node; not mixed). Summaries only: `upto_step` keeps the steps <= it (a live diagnosis
    replayed step by step), `with_tail` False ignores the end-of-recording tail (what a live
    view has not seen yet). An empty sequence is an empty set of recordings."""
    items = [source] if isinstance(source, (Recording, Summaries)) else list(source)
    if items and all(isinstance(x, Summaries) for x in items):
        ev = evidence.from_summaries(items, upto_step=upto_step, with_tail=with_tail)
    elif any(isinstance(x, Summaries) for x in items):
        raise TypeError("diagnose: give recordings or summaries, not both")
    elif upto_step is not None or not with_tail:
        raise TypeError("diagnose: upto_step and with_tail apply to summaries only")
    else:
        ev = evidence.from_recordings(items)
    return assemble_report(ev, hang_after_s)


def diagnose_dirs(
    dirs: Sequence[str | Path],
    hang_after_s: float = DEFAULT_HANG_AFTER_S,
    from_summaries: bool = False,
) -> dict[str, Any]:
    """The diagnosis of recorded DIR(s), one per node of one job (module doc); raises what
    reading them raises (PermissionError, ArgusError)."""
    paths = expand_dirs(dirs)
    if any(has_summaries(d) and not has_events(d) for d in paths) or from_summaries:
        summs = [load_summaries(d) if has_summaries(d) else build_summaries([load_recording(d)])
                 for d in paths]
        return assemble_report(evidence.from_summaries(merge_nodes(summs)), hang_after_s)
    return diagnose([load_recording(d) for d in paths], hang_after_s)
