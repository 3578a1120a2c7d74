"""scripts/argus-alerts.yml, the example alerting rules of docs/daemon.md, checked by
Prometheus's own rule tester (`promtool test rules`, Debian's prometheus package, installed
by `make setup`): each rule fires on the series the daemon exports, and the straggler
alert does not fire for a job that ended before its `for` elapsed (the daemon drops a
finished job's series at the next scrape: Prometheus then marks them stale, written as
`stale` below). The contrast case is the exposition before that change, which kept a
finished job's series for `job_grace_s` (300 s): there the alert fired for a job gone
for minutes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
RULES = Path(__file__).resolve().parents[2] / "scripts" / "argus-alerts.yml"
PROMTOOL = shutil.which("promtool") or (
    "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
L = 'job_id="j{n}",rank="1",host="n1"'

TESTS = """
rule_files: [{rules}]
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      # j1 straggles for 10 minutes; j2 for 3, then its job ends (series gone: stale);
      # j3 is j2 as the old exposition had it: the last value kept for 300 s more
      - series: 'argus_straggler_score{{{j1}}}'
        values: '4x40'
      - series: 'argus_straggler_score{{{j2}}}'
        values: '4x12 stale'
      - series: 'argus_straggler_score{{{j3}}}'
        values: '4x32 stale'
      - series: 'argus_hang{{{j4}}}'
        values: '0x3 1x8'
      # rank 1 of j5 exits at 1 min while its job runs on; at 4 min the job ends
      - series: 'argus_rank_up{{{j5}}}'
        values: '1x4 0x12 stale'
      - series: 'argus_drops_total{{host="n1",kind="call_ringbuf"}}'
        values: '0+10x60'
    alert_rule_test:
      - eval_time: 4m
        alertname: ArgusStraggler
        exp_alerts: []
      - eval_time: 8m
        alertname: ArgusStraggler
        exp_alerts:
          - exp_labels: {{severity: warning, job_id: j1, rank: "1", host: n1}}
            exp_annotations:
              summary: >-
                Rank 1 of job j1 on n1 has been a straggler for 5 minutes (score 4).
          - exp_labels: {{severity: warning, job_id: j3, rank: "1", host: n1}}
            exp_annotations:
              summary: >-
                Rank 1 of job j3 on n1 has been a straggler for 5 minutes (score 4).
      - eval_time: 2m
        alertname: ArgusCollectiveHang
        exp_alerts:
          - exp_labels: {{severity: critical, job_id: j4, rank: "1", host: n1}}
            exp_annotations:
              summary: >-
                Rank 1 of job j4 on n1 is part of a hung collective (waiting in it, or
                never arrived).
      - eval_time: 2m30s
        alertname: ArgusRankDown
        exp_alerts:
          - exp_labels: {{severity: warning, job_id: j5, rank: "1", host: n1}}
            exp_annotations:
              summary: >-
                Rank 1 of job j5 on n1 exited while its job's other ranks are still traced.
      - eval_time: 6m
        alertname: ArgusRankDown
        exp_alerts: []
      - eval_time: 12m
        alertname: ArgusEventsDropped
        exp_alerts:
          - exp_labels: {{severity: warning, host: n1, kind: call_ringbuf}}
            exp_annotations:
              summary: >-
                argus on n1 has been losing call_ringbuf events in BPF for 10 minutes: its
                diagnosis misses data.
"""


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (make setup installs "
                    "Debian's prometheus package)")
def test_promtool_checks_the_example_rules(tmp_path):
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 4 rules found" in check.stdout
    t = tmp_path / "argus-alerts.test.yml"
    t.write_text(TESTS.format(rules=RULES, **{f"j{n}": L.format(n=n) for n in range(1, 6)}))
    res = subprocess.run([PROMTOOL, "test", "rules", str(t)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (make setup installs "
                    "Debian's prometheus package)")
def test_promtool_would_catch_a_wrong_expectation(tmp_path):
    """The rule test can fail: the ended job j2 expected to alert is an error."""
    wrong = TESTS.replace("job_id: j3,", "job_id: j2,")
    t = tmp_path / "wrong.test.yml"
    t.write_text(wrong.format(rules=RULES, **{f"j{n}": L.format(n=n) for n in range(1, 6)}))
    res = subprocess.run([PROMTOOL, "test", "rules", str(t)], capture_output=True, text=True)
    assert res.returncode != 0 and "FAILED" in res.stdout + res.stderr
