"""Rich rendering of an argus.report/1 object for a terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "dim"}


def _fmt(x: Any) -> str:
    return "-" if x is None else (f"{x:.1f}" if isinstance(x, float) else str(x))


def render_report(report: dict[str, Any]) -> Group:
    """A renderable: a summary line, the findings table, then the per-rank table."""
    steps = report.get("steps") or {}
    if steps.get("detected"):
        head = (
            f"{len(report.get('ranks') or [])} rank(s), {steps.get('count')} complete steps, "
            f"median step {_fmt(steps.get('step_time_ms_p50'))} ms "
            f"(found from {steps.get('method')})"
        )
    else:
        head = f"{len(report.get('ranks') or [])} rank(s); no repeating training step found"
    parts: list[Any] = [Text(head, style="bold")]
    align = report.get("clock_alignment") or {}
    offs = align.get("offsets_ns") or {}
    if len(offs) > 1:
        parts.append(
            Text(
                "clock offsets: "
                + ", ".join(f"{h} {v / 1e6:+.3f} ms" for h, v in offs.items())
                + f" (residual {align.get('residual_ns', 0) / 1e3:.0f} us)"
            )
        )
    drops = {k: v for k, v in (report.get("drops") or {}).items() if v}
    if drops:
        parts.append(
            Text("dropped: " + ", ".join(f"{k}={v}" for k, v in drops.items()), style="yellow")
        )
    findings = report.get("findings") or []
    if findings:
        t = Table(title="Findings", title_justify="left", expand=False)
        t.add_column("severity")
        t.add_column("kind")
        t.add_column("summary", overflow="fold")
        for f in findings:
            t.add_row(
                Text(f["severity"], style=SEVERITY_STYLE.get(f["severity"], "")),
                f["kind"],
                f["summary"],
            )
        parts.append(t)
    else:
        parts.append(Text("No findings: the job looks healthy.", style="green"))
    rt = Table(title="Ranks", title_justify="left")
    for col in ("rank", "host", "tgid", "steps", "p50 ms", "p90 ms", "max ms"):
        rt.add_column(col, justify="right" if col not in ("host",) else "left")
    for r in report.get("ranks") or []:
        st = r.get("step_time_ms") or {}
        rt.add_row(
            _fmt(r.get("rank")),
            _fmt(r.get("host")),
            _fmt(r.get("tgid")),
            _fmt(r.get("steps")),
            _fmt(st.get("p50")),
            _fmt(st.get("p90")),
            _fmt(st.get("max")),
        )
    parts.append(rt)
    return Group(*parts)


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Print the report to `console` (stdout by default)."""
    (console or Console()).print(render_report(report))
