"""Paths of real CUDA libraries from PyPI wheels, provided by `make real-libs`.

They are not downloaded by tests: the Makefile fetches them once into build/real/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REAL_DIR = REPO / "build" / "real"
LIBCUDART = REAL_DIR / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.12"
LIBCUDART_VERSION = "12.4.127"  # nvidia-cuda-runtime-cu12==12.4.127


def real_libcudart() -> Path:
    """The real libcudart.so.12, or skip the test saying how to get it."""
    if not LIBCUDART.is_file():
        pytest.skip(
            f"real libcudart absent ({LIBCUDART}): run `make real-libs` to fetch "
            f"nvidia-cuda-runtime-cu12=={LIBCUDART_VERSION} from PyPI"
        )
    return LIBCUDART
