"""The gpu tier: the NVML channel on a real NVIDIA GPU. Skipped, with the reason, elsewhere.

Reads every device through the real driver's libnvidia-ml (never ARGUS_NVML_LIB) and checks
that what NVML reports is sane and that unsupported calls are recorded, not raised.
"""

import os
from pathlib import Path

import polars as pl
import pytest

from argus.collect.nvml import NVML_LIB_ENV, GpuSampler
from argus.recording import schema

pytestmark = pytest.mark.gpu


def _reason() -> str | None:
    if not Path("/dev/nvidia0").exists():
        return "gpu tier: no NVIDIA GPU on this machine (/dev/nvidia0 is absent)"
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return "gpu tier: pynvml (nvidia-ml-py) is not installed; run `make setup`"
    return None


@pytest.fixture(scope="module", autouse=True)
def _require_gpu():
    reason = _reason()
    if reason:
        pytest.skip(reason)


def test_real_devices_are_sampled_with_sane_values():
    env = {k: v for k, v in os.environ.items() if k != NVML_LIB_ENV}
    s = GpuSampler(interval_s=0.2, env=env)
    assert s.open(), s.reason
    for _ in range(3):
        s.sample_once()
    ranks = [{"tgid": os.getpid(), "rank": 0, "local_rank": 0, "env": {}}]
    gpu, frame, joins = s.finish(ranks)
    assert gpu["available"] is True and gpu["driver"]
    n = len(gpu["devices"])
    assert n >= 1 and frame.height == 3 * n and frame.schema == pl.Schema(schema.GPU_SCHEMA)
    for d in gpu["devices"]:
        assert d["bus_id"] and d["uuid"].startswith(("GPU-", "MIG-"))
        assert d["sm_clock_max_mhz"] and d["sm_clock_max_mhz"] > 300
    assert frame["sm_clock_mhz"].null_count() == 0
    assert (frame["sm_clock_mhz"] <= frame["sm_clock_max_mhz"] * 1.05).all()
    assert frame["throttle_reasons"].null_count() == 0  # every GPU since Kepler reports them
    assert frame["temp_c"].drop_nulls().is_between(0, 120).all()
    assert (frame["mem_used_bytes"] <= frame["mem_total_bytes"]).drop_nulls().all()
    assert (
        joins[os.getpid()]["device"] == 0
        and frame.filter(pl.col("device") == 0)["rank"].to_list() == [0] * 3
    )
    # Whatever this GPU does not support is a manifest entry, not an error.
    assert set(gpu["errors"]) <= {"processes"}, gpu["errors"]
