/* argus.bpf.c: the common part of the one BPF program set argus loads per node.
 *
 * The loader (argus.collect.tracer) compiles this file followed by the family files it
 * needs, as one translation unit (bcc only turns functions of the main file into programs,
 * so the families are concatenated, each with a #line directive, rather than #included):
 *   proc.bpf.c        (always) process lifecycle tracepoints; the traced-process table
 *   calls.bpf.c       (channels cuda/nccl/torch) generic uprobe/uretprobe program for every probe spec
 *                     channel (CUDA runtime/driver, NCCL, PyTorch c10d): what to capture is
 *                     data (the probe table), not code
 *   cpu_stacks.bpf.c  (channel cpu) perf_event cpu-clock sampling of the traced processes
 *
 * Maps defined here, shared by the families:
 *   watched  tgid -> ARGUS_W_* flags: the in-kernel filter (launchers and ranks)
 *   drops    array of ARGUS_NDROPS counters: every drop, full map and failed read/walk
 *
 * Sizes come from -D flags (ARGUS_MAX_TGIDS, ...), with defaults below.
 */
#include <uapi/linux/ptrace.h>
#include "argus.h"

#ifndef ARGUS_MAX_TGIDS
#define ARGUS_MAX_TGIDS 4096
#endif

BPF_HASH(watched, u32, u32, ARGUS_MAX_TGIDS);
BPF_ARRAY(drops, u64, ARGUS_NDROPS);

static __always_inline void argus_drop(int what)
{
    u64 *v = drops.lookup(&what);
    if (v)
        __sync_fetch_and_add(v, 1);
}
