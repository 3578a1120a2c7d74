"""Old name of `argus.analyze.compress` (building summaries) and of the diagnosis of
summaries (`argus.analyze.diagnosis.diagnose`), kept for the callers not yet moved
(argus.daemon.service, argus.present.top); new code imports those modules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from argus.analyze.compress import TAIL_SEQS, build_summaries
from argus.analyze.evidence import from_summaries
from argus.analyze.report import DEFAULT_HANG_AFTER_S, assemble_report
from argus.recording.summaries import Summaries

__all__ = ["TAIL_SEQS", "build_summaries", "diagnose_summaries"]


def diagnose_summaries(
    summs: Sequence[Summaries],
    hang_after_s: float = DEFAULT_HANG_AFTER_S,
    upto_step: int | None = None,
    with_tail: bool = True,
) -> dict[str, Any]:
    """`diagnosis.diagnose(summs, ...)` (also for an empty list: a report of no summaries)."""
    return assemble_report(from_summaries(summs, upto_step, with_tail), hang_after_s)
