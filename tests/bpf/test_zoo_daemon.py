"""`argus daemon` on a zoo job started by a plain shell launcher (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT only: tests/workloads/shell_launch.sh), and by the
same shell in Open MPI's style (OMPI_COMM_WORLD_RANK/_SIZE/_LOCAL_RANK, no RANK), real PyTorch
DDP on 4 ranks with a 25 % host straggler: /state must show ONE job holding the 4 ranks
(not four one-rank jobs), and /metrics the straggler's `argus_straggler_score` > 0 within
30 s of the job's first step (tests/workloads/harness.py daemon_check, as scripts/zoo).

The daemon discovers only processes named `zoo-rank` (the job renames its ranks once torch
is imported; `libraries = false`), so torch processes of other test runs on this machine
are neither traced nor counted."""

from __future__ import annotations

import random

import pytest
from workloads import harness as zh

pytestmark = [pytest.mark.bpf, pytest.mark.zoo]


@pytest.fixture(scope="module", params=["shell", "mpi"])
def daemon_run(request, tmp_path_factory):
    return zh.daemon_check("ddp", tmp_path_factory.mktemp(f"zoo-daemon-{request.param}"),
                           random.Random(13), verbose=False, launcher=request.param)


def test_one_job_with_the_four_ranks(daemon_run):
    assert daemon_run["one_job_ok"], daemon_run["jobs_seen"]
    (job,) = daemon_run["jobs_seen"]
    assert [rank for rank, _tgid in job["ranks"]] == [0, 1, 2, 3]


def test_straggler_score_in_metrics_within_30_s(daemon_run):
    assert daemon_run["straggler_ok"], (
        f"straggler rank {daemon_run['straggler_rank']}: score after "
        f"{daemon_run['straggler_score_s']} s")
