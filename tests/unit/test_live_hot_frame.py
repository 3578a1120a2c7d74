"""`argus top`'s hottest frame (argus/present/live.py) charges samples like the differential
profile (hotspot.attribute): the innermost Python frame when a sample has Python frames."""

from __future__ import annotations

import polars as pl
import pytest

from argus.present.live import _hot_frames
from argus.recording import schema

pytestmark = pytest.mark.unit


def _stacks(rows: list[dict]) -> pl.DataFrame:
    base = {"ts_ns": 0, "interval_ns": 1_000_000_000, "tgid": 10, "tid": 10, "thread": "python3",
            "state": "on_cpu", "blocked_ns": None}
    return pl.DataFrame([{**base, **r} for r in rows], schema=schema.STACKS_SCHEMA)


def test_python_frames_win_over_interpreter_and_library_frames():
    py = ["PyNumber_Add", "slow_rank_compute", "train_step", "main"]
    py_mods = ["python3.11", "py:/job/ddp_train.py:34", "py:/job/ddp_train.py:60",
               "py:/job/ddp_train.py:66"]
    st = _stacks([
        # rank 0: 30 samples in the Python function, 20 in a native leaf of the program
        {"rank": 0, "count": 30, "functions": py, "modules": py_mods},
        {"rank": 0, "count": 20, "functions": ["memcpy", "forward_kernel"],
         "modules": ["libc.so.6", "trainer"]},
        # rank 1: only native samples; 40 waiting in a CUDA sync do not count
        {"rank": 1, "count": 5, "functions": ["memcpy", "pack_batch"],
         "modules": ["libc.so.6", "trainer"]},
        {"rank": 1, "count": 40, "functions": ["cudaStreamSynchronize", "step"],
         "modules": ["libcudart.so.12", "trainer"]},
        # rank 2: everything idle: the most frequent named leaf is shown
        {"rank": 2, "count": 7, "functions": ["epoll_wait"], "modules": ["libc.so.6"]},
        # off-CPU rows never count
        {"rank": 0, "count": 0, "functions": ["sleeper"], "modules": ["x"], "state": "off_cpu"},
    ])
    hot = _hot_frames(st)
    assert hot == {0: "slow_rank_compute (ddp_train.py:34)", 1: "pack_batch", 2: "epoll_wait"}


def test_no_samples_no_hot_frames():
    assert _hot_frames(schema.empty_stacks()) == {}
