"""ctypes mirror of bpf/argus.h: the one Python copy of every struct crossing from BPF.

tests/unit/test_abi.py compiles a C program that prints sizeof/offsetof of the C structs and
compares them with these, so the two cannot drift apart silently.
"""

from __future__ import annotations

import ctypes as ct

REC_CALL = 1
REC_CALL_STR = 2
REC_PROC = 3
REC_GROUP = 4

PF_EXIT = 1 << 0
PF_STACK = 1 << 1
PF_UID_HASH = 1 << 2
PF_OUT = 1 << 3
PF_STR = 1 << 4
PF_SEQ = 1 << 5
PF_PEER = 1 << 6
PF_NO_RECORD = 1 << 7
PF_GROUP = 1 << 8

REG_ARGS = 6
STACK_ARGS = 4
MAX_ARGS = REG_ARGS + STACK_ARGS
STR_LEN = 64
MAX_DEPTH = 4
COMM_LEN = 16
C10D_HEAD = 48
C10D_NAME_OFF = 32
C10D_NAME_LEN = 64

PROC_FORK = 1
PROC_EXEC = 2
PROC_EXIT = 3

W_TRACE = 1 << 0
W_DESCEND = 1 << 1

# Index -> name of the `drops` array (ARGUS_DROP_*), in order.
DROP_NAMES = (
    "call_ringbuf",
    "proc_ringbuf",
    "call_depth",
    "return_orphan",
    "stack_user_walk",
    "stack_kernel_walk",
    "stack_map_full",
    "counts_map_full",
    "read_fault",
    "host_map_full",
    "py_walk_failed",
    "py_stack_map_full",
)

# Host context (host.bpf.c): argus_host_key.kind -> name (host.parquet `kind`).
HOST_CPU = 1
HOST_TCP = 2
HOST_OOM = 3
HOST_BLOCK = 4
HOST_CPU_WAIT = 5
HOST_ON_CPU = 6
HOST_KINDS = {HOST_CPU: "cpu_contention", HOST_TCP: "tcp_retransmit", HOST_OOM: "oom_kill",
              HOST_BLOCK: "block_io", HOST_CPU_WAIT: "cpu_wait", HOST_ON_CPU: "on_cpu"}
WAIT_BUCKET_NS = 10_000_000  # ARGUS_WAIT_BUCKET_NS: the time slots of cpu_wait rows
NATIVE_DEPTH = 127  # ARGUS_NATIVE_DEPTH: frames of one native stack in a CPU sample
# Python frames in CPU samples (ARGUS_PY_*).
PY_DEPTH = 32
PY_THREADS = 32
PY_CFRAME = 1 << 0
PY_PTHREAD = 1 << 1
PY_IS_ENTRY = 1 << 2
PY_OWNER = 1 << 3
PY_ALL_ENTRY = 1 << 4
PY_CODE_ENTRY = 1
PY_STAT_NAMES = ("walked", "no_thread_state", "no_frame", "truncated")  # py_stats, in order
OFFCPU_USER_DEPTH = 32
OFFCPU_KERNEL_DEPTH = 16
OFFCPU_SCAN = 32


class ProbeKey(ct.Structure):
    _fields_ = [("tgid", ct.c_uint32), ("pad", ct.c_uint32), ("addr", ct.c_uint64)]


class ProbeInfo(ct.Structure):
    _fields_ = [
        ("probe_id", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("out_arg", ct.c_uint8),
        ("str_arg", ct.c_uint8),
        ("seq_arg", ct.c_uint8),
        ("peer_arg", ct.c_uint8),
        ("pad", ct.c_uint32),
    ]


class Call(ct.Structure):
    _fields_ = [
        ("type", ct.c_uint32),
        ("probe_id", ct.c_uint32),
        ("tgid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("ts_ns", ct.c_uint64),
        ("dur_ns", ct.c_uint64),
        ("args", ct.c_uint64 * MAX_ARGS),
        ("uid_hash", ct.c_uint64),
        ("out", ct.c_uint64),
        ("seq", ct.c_int64),
        ("ret", ct.c_int64),
    ]


class CallStr(ct.Structure):
    _fields_ = [("call", Call), ("str", ct.c_char * STR_LEN)]


class GroupRec(ct.Structure):
    _fields_ = [
        ("type", ct.c_uint32),
        ("tgid", ct.c_uint32),
        ("backend", ct.c_uint64),
        ("head", ct.c_uint8 * C10D_HEAD),
        ("name_len", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("name", ct.c_uint8 * C10D_NAME_LEN),
    ]


class ProcEvent(ct.Structure):
    _fields_ = [
        ("type", ct.c_uint32),
        ("what", ct.c_uint32),
        ("ts_ns", ct.c_uint64),
        ("tgid", ct.c_uint32),
        ("child", ct.c_uint32),
        ("comm", ct.c_char * COMM_LEN),
    ]


class StackKey(ct.Structure):
    _fields_ = [
        ("tgid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("user_stack_id", ct.c_uint64),
        ("kernel_stack_id", ct.c_uint64),
        ("comm", ct.c_char * COMM_LEN),
        ("py_stack_id", ct.c_uint64),
    ]


class NativeStack(ct.Structure):
    _fields_ = [
        ("len", ct.c_uint32),
        ("pad", ct.c_uint32),
        ("ip", ct.c_uint64 * NATIVE_DEPTH),
    ]


class PyProc(ct.Structure):
    _fields_ = [
        ("runtime", ct.c_uint64),
        ("version", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("interp_head", ct.c_uint32),
        ("threads_head", ct.c_uint32),
        ("ts_next", ct.c_uint32),
        ("ts_tid", ct.c_uint32),
        ("ts_frame", ct.c_uint32),
        ("cframe_frame", ct.c_uint32),
        ("frame_code", ct.c_uint32),
        ("frame_prev", ct.c_uint32),
        ("frame_entry", ct.c_uint32),
        ("frame_owner", ct.c_uint32),
        ("pthread_tid", ct.c_uint32),
        ("pad", ct.c_uint32),
    ]


class PyStack(ct.Structure):
    _fields_ = [
        ("depth", ct.c_uint32),
        ("truncated", ct.c_uint32),
        ("code", ct.c_uint64 * PY_DEPTH),
    ]


class Frame(ct.Structure):
    _fields_ = [
        ("ts_ns", ct.c_uint64),
        ("sp", ct.c_uint64),
        ("args", ct.c_uint64 * MAX_ARGS),
        ("uid_hash", ct.c_uint64),
        ("seq", ct.c_int64),
        ("probe_id", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("out_arg", ct.c_uint8),
        ("str_arg", ct.c_uint8),
        ("pad", ct.c_uint8 * 6),
    ]


class Inflight(ct.Structure):
    _fields_ = [("tgid", ct.c_uint32), ("depth", ct.c_uint32), ("frames", Frame * MAX_DEPTH)]


class SeqKey(ct.Structure):
    _fields_ = [("tgid", ct.c_uint32), ("peer", ct.c_int32), ("comm", ct.c_uint64)]


class CountKey(ct.Structure):
    _fields_ = [("tgid", ct.c_uint32), ("probe_id", ct.c_uint32)]


class HostKey(ct.Structure):
    _fields_ = [
        ("kind", ct.c_uint32),
        ("tgid", ct.c_uint32),
        ("detail", ct.c_uint64),
        ("comm", ct.c_char * COMM_LEN),
    ]


class HostVal(ct.Structure):
    _fields_ = [("count", ct.c_uint64), ("total_ns", ct.c_uint64)]


class Preempt(ct.Structure):
    _fields_ = [
        ("ts_ns", ct.c_uint64),
        ("tgid", ct.c_uint32),
        ("woken", ct.c_uint32),
        ("comm", ct.c_char * COMM_LEN),
    ]


class OffCpu(ct.Structure):
    _fields_ = [
        ("ts_ns", ct.c_uint64),
        ("tgid", ct.c_uint32),
        ("user_len", ct.c_int32),
        ("kernel_len", ct.c_int32),
        ("scan_len", ct.c_int32),
        ("comm", ct.c_char * COMM_LEN),
        ("user", ct.c_uint64 * OFFCPU_USER_DEPTH),
        ("kernel", ct.c_uint64 * OFFCPU_KERNEL_DEPTH),
        ("scan", ct.c_uint64 * OFFCPU_SCAN),
        ("site", ct.c_uint64),
        ("stack_ns", ct.c_uint64),
    ]


# C name -> mirror, for the drift test.
STRUCTS = {
    "argus_probe_key": ProbeKey,
    "argus_probe_info": ProbeInfo,
    "argus_call": Call,
    "argus_call_str": CallStr,
    "argus_group_rec": GroupRec,
    "argus_proc_event": ProcEvent,
    "argus_stack_key": StackKey,
    "argus_native_stack": NativeStack,
    "argus_py_proc": PyProc,
    "argus_py_stack": PyStack,
    "argus_frame": Frame,
    "argus_inflight": Inflight,
    "argus_seq_key": SeqKey,
    "argus_count_key": CountKey,
    "argus_host_key": HostKey,
    "argus_host_val": HostVal,
    "argus_preempt": Preempt,
    "argus_offcpu": OffCpu,
}
