"""The GPU-less simulated training job: N rank processes over the stand-in libcudart,
libcuda, libnccl (build/stubs), with injectable faults and a ground-truth file.

Stdlib only, so `scripts/simulate` runs with any python3 >= 3.9.

    from argus.sim import SimConfig, run_job, start_job
    truth = run_job(SimConfig(ranks=4, steps=50, faults=["straggler:rank=2,factor=1.5"]))
"""

from argus.sim.faults import FaultSpecError, parse_fault
from argus.sim.launcher import SimConfig, SimError, SimJob, find_build_dir, run_job, start_job

__all__ = [
    "FaultSpecError",
    "SimConfig",
    "SimError",
    "SimJob",
    "find_build_dir",
    "parse_fault",
    "run_job",
    "start_job",
]
