"""What a diagnosis should say about a simulated job: the planted faults vs the findings.

`expected(truth)` maps each planted fault (truth JSON of `argus.sim`) to the findings that
name it; `score(report, truth)` says, per fault, whether an argus.report/1 object found it
(right kind on the right rank) and lists the warning/critical findings no fault explains
(false alarms). Used by `argus demo`, the end-to-end tests and `scripts/accuracy`. Reads
plain dicts only: it imports neither the analysers nor the collectors.

| fault | found when a warning/critical finding ... |
|---|---|
| straggler, bubble | `straggler` on each faulty rank |
| throttle | `gpu_throttle` or `straggler` on each faulty rank (1) |
| host_stall | `straggler` or `cpu_hotspot` (its data loading) on the rank |
| jit_stall | `straggler` or `cpu_hotspot` on the rank |
| link | `collective_stall` |
| hang | `collective_hang` whose `missing_ranks` are the hung ranks |

(1) a throttle's slower kernels make a GPU straggler; NVML (the simulator's libnvidia-ml,
read when ARGUS_NVML_LIB points at it) adds the `gpu_throttle` finding that explains it.
`anomalous_window` findings (rank-less) are never false alarms when a fault was planted.
"""

from __future__ import annotations

from typing import Any

SERIOUS = ("warning", "critical")
KINDS = {
    "straggler": ("straggler",),
    "throttle": ("gpu_throttle", "straggler"),
    "bubble": ("straggler",),
    "host_stall": ("straggler", "cpu_hotspot"),  # the hotspot names its data loading
    "jit_stall": ("straggler", "cpu_hotspot"),
    "link": ("collective_stall",),
    "hang": ("collective_hang",),
}


def fault_ranks(fault: dict[str, Any], truth: dict[str, Any]) -> list[int]:
    """The ranks a fault was planted on (a bubble's stage: every rank of that stage)."""
    if fault["kind"] == "bubble" and fault.get("params", {}).get("stage") is not None:
        stage = fault["params"]["stage"]
        return sorted(r["rank"] for r in truth["ranks"] if r.get("stage") == stage)
    if fault["kind"] == "bubble" and fault.get("ranks"):
        stages = {r["stage"] for r in truth["ranks"] if r["rank"] in fault["ranks"]}
        return sorted(r["rank"] for r in truth["ranks"] if r.get("stage") in stages)
    return sorted(fault.get("ranks") or [])


def _names(f: dict[str, Any], fault: dict[str, Any], ranks: list[int]) -> bool:
    if f["severity"] not in SERIOUS or f["kind"] not in KINDS[fault["kind"]]:
        return False
    if f["kind"] == "collective_hang":
        return sorted(f.get("missing_ranks") or []) == ranks
    if f["kind"] == "collective_stall":
        return True
    return f.get("rank") in ranks


def score(report: dict[str, Any], truth: dict[str, Any]) -> dict[str, Any]:
    """{"faults": [{kind, ranks, spec, found: bool, found_ranks}], "false_alarms": [...]}."""
    faults = []
    explained: set[int] = set()
    findings = report.get("findings") or []
    for fault in truth.get("faults") or []:
        ranks = fault_ranks(fault, truth)
        hits = [i for i, f in enumerate(findings) if _names(f, fault, ranks)]
        explained |= set(hits)
        found_ranks = sorted({findings[i].get("rank") for i in hits} - {None})
        if fault["kind"] in ("hang", "link"):
            found = bool(hits)
        else:
            found = set(ranks) <= set(found_ranks)
        faults.append({"kind": fault["kind"], "ranks": ranks, "spec": fault.get("spec"),
                       "found": found, "found_ranks": found_ranks})
    false_alarms = [
        f
        for i, f in enumerate(findings)
        if f["severity"] in SERIOUS
        and i not in explained
        and not (faults and f["kind"] == "anomalous_window")
    ]
    return {"faults": faults, "false_alarms": false_alarms}


def describe(report: dict[str, Any], truth: dict[str, Any]) -> str:
    """One line: 'planted: straggler on rank 2 from step 0 - found: straggler rank 2'."""
    planted = []
    for fault in truth.get("faults") or []:
        ranks = fault_ranks(fault, truth)
        who = "rank" + ("s " if len(ranks) > 1 else " ") + ",".join(map(str, ranks))
        planted.append(f"{fault['kind']} on {who} from step {fault.get('start', 0)}")
    found = []
    for f in report.get("findings") or []:
        if f["severity"] not in SERIOUS or f["kind"] == "anomalous_window":
            continue
        if f["kind"] == "collective_hang":
            missing = ",".join(map(str, f.get("missing_ranks") or [])) or "none"
            found.append(f"collective_hang seq {f.get('seq')} missing ranks {missing}")
        elif f.get("rank") is not None:
            found.append(f"{f['kind']} rank {f['rank']}")
        else:
            found.append(f["kind"])
    return (f"planted: {'; '.join(planted) or 'nothing (healthy)'} — "
            f"found: {'; '.join(found) or 'nothing'}")
