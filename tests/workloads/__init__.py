"""The workload zoo: real PyTorch (gloo) and simulated (CUDA/NCCL stand-in) training jobs in
the shapes real jobs have, with planted faults and a ground truth (shapes.py, train.py,
launch.py, shell_launch.sh; scripts/zoo scores argus on them; docs/zoo-baseline.md)."""
