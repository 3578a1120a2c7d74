"""BpfSession.items / delete_keys on real BPF hash maps: the batch syscalls (256 entries a
call, a bigger buffer when a bucket overflows it) and the key-by-key fallback read the same
entries, delete exactly what they are asked to, and copy what they return."""

from __future__ import annotations

import ctypes as ct

import pytest

from argus.collect.bcc_adapter import BATCH, BpfSession

pytestmark = pytest.mark.bpf

PROGRAM = """
struct k { u32 a; u32 b; char c[16]; };
BPF_HASH(counts, struct k, u64, 4096);
BPF_HASH(by_tid, u32, struct k, 4096);
int unused(void *ctx) { return 0; }
"""
N = 3 * BATCH + 7  # several batches and a partial one


@pytest.fixture(params=["batch", "key by key"])
def session(request):
    s = BpfSession.from_text(PROGRAM, [])
    s._batch = request.param == "batch"
    counts, by_tid = s.table("counts"), s.table("by_tid")
    for i in range(N):
        key = counts.Key(a=i, b=2 * i)
        counts[key] = ct.c_ulong(10 * i)
        by_tid[by_tid.Key(i)] = key
    yield s
    s.close()


def test_every_entry_is_read_once_with_its_value(session):
    got = session.items("counts")
    assert sorted((k.a, k.b, v) for k, v in got) == [(i, 2 * i, 10 * i) for i in range(N)]
    by_tid = session.items("by_tid")
    assert sorted((k, v.a, v.b) for k, v in by_tid) == [(i, i, 2 * i) for i in range(N)]
    assert len(session.items("counts")) == N  # reading removed nothing


def test_read_and_delete_empties_the_map_and_returns_every_entry(session):
    got = session.items("counts", delete=True)
    assert sorted(v for _k, v in got) == [10 * i for i in range(N)]
    assert session.items("counts") == []


def test_delete_keys_removes_exactly_those_keys(session):
    gone = [k for k, _v in session.items("by_tid") if k % 3 == 0]
    session.delete_keys("by_tid", gone)
    assert sorted(k for k, _v in session.items("by_tid")) == [i for i in range(N) if i % 3]
    session.delete_keys("by_tid", gone)  # already gone: no error, nothing else removed
    assert len(session.items("by_tid")) == N - len(gone)


def test_returned_keys_are_copies(session):
    got = session.items("counts")
    before = [(k.a, k.b) for k, _v in got]
    session.items("counts")  # a second read reuses no buffer of the first
    assert [(k.a, k.b) for k, _v in got] == before


def test_keys_read_by_items_are_deleted_in_one_batch(session, monkeypatch):
    """The keys items() returned are of the type delete_keys' batch takes (one table object
    per map): no key-by-key fallback where the kernel has batch operations."""
    from argus.collect import bcc_adapter

    each = []
    monkeypatch.setattr(bcc_adapter, "_delete_each", lambda t, keys: each.append(len(keys)))
    keys = [k for k, _v in session.items("counts")][:100]
    session.delete_keys("counts", keys)
    if session._batch:
        assert each == []
        assert len(session.items("counts")) == N - 100
    else:
        assert each == [100]
