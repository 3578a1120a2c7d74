/* argus.h: every struct that crosses between the BPF programs and user space.
 *
 * Mirrored once in Python (argus/collect/abi.py); tests/unit/test_abi.py compiles a tiny
 * C program that prints sizeof/offsetof of each struct here and compares them with the
 * ctypes mirror, so drift fails the build. Only fixed-width types; explicit padding.
 */
#ifndef ARGUS_H
#define ARGUS_H

#ifndef ARGUS_BPF  /* defined by the loader (cflags) when compiling BPF */
#include <stdint.h>
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
typedef int32_t __s32;
typedef int64_t __s64;
#endif

/* Record types: the first __u32 of every ring-buffer record. */
#define ARGUS_REC_CALL 1      /* struct argus_call */
#define ARGUS_REC_CALL_STR 2  /* struct argus_call_str (a call that also captured a string) */
#define ARGUS_REC_PROC 3      /* struct argus_proc_event */
#define ARGUS_REC_GROUP 4     /* struct argus_group_rec (a c10d group's first call) */

/* Probe flags (struct argus_probe_info.flags): what the generic uprobe program captures. */
#define ARGUS_PF_EXIT (1u << 0)       /* a return probe is attached: record dur_ns and ret */
#define ARGUS_PF_STACK (1u << 1)      /* read ARGUS_STACK_ARGS words above the return address */
#define ARGUS_PF_UID_HASH (1u << 2)   /* hash the 128-byte by-value ncclUniqueId at sp+8 */
#define ARGUS_PF_OUT (1u << 3)        /* at exit, read the u64 that args[out_arg] points to */
#define ARGUS_PF_STR (1u << 4)        /* read a NUL-terminated string args[str_arg] points to */
#define ARGUS_PF_SEQ (1u << 5)        /* count per (tgid, args[seq_arg], peer) -> seq */
#define ARGUS_PF_PEER (1u << 6)       /* args[peer_arg] is a p2p peer: separate seq per peer */
#define ARGUS_PF_NO_RECORD (1u << 7)  /* count only (call_counts), no ring-buffer record */
#define ARGUS_PF_GROUP (1u << 8)      /* args[seq_arg] is a c10d::Backend: at seq 0, record it */

#define ARGUS_REG_ARGS 6
#define ARGUS_STACK_ARGS 4
#define ARGUS_MAX_ARGS (ARGUS_REG_ARGS + ARGUS_STACK_ARGS)
#define ARGUS_STR_LEN 64
#define ARGUS_MAX_DEPTH 4  /* nested probed calls per thread tracked for return probes */
#define ARGUS_COMM_LEN 16

/* Key of the probe table: a probed instruction address in one traced process. */
struct argus_probe_key {
    __u32 tgid;
    __u32 pad;
    __u64 addr;
};

/* Value of the probe table. Arg indexes are 0-based into argus_call.args. */
struct argus_probe_info {
    __u32 probe_id;
    __u32 flags;
    __u8 out_arg;
    __u8 str_arg;
    __u8 seq_arg;
    __u8 peer_arg;
    __u32 pad;
};

/* One probed call: written at entry (entry-only probes) or at return (ARGUS_PF_EXIT). */
struct argus_call {
    __u32 type;      /* ARGUS_REC_CALL or ARGUS_REC_CALL_STR */
    __u32 probe_id;
    __u32 tgid;
    __u32 tid;
    __u64 ts_ns;     /* entry, bpf_ktime_get_ns (CLOCK_MONOTONIC) */
    __u64 dur_ns;    /* 0 for entry-only probes */
    __u64 args[ARGUS_MAX_ARGS];  /* rdi rsi rdx rcx r8 r9, then stack words at sp+8.. */
    __u64 uid_hash;  /* ARGUS_PF_UID_HASH: FNV-1a of the 128-byte ncclUniqueId */
    __u64 out;       /* ARGUS_PF_OUT: the u64 args[out_arg] pointed to at return */
    __s64 seq;       /* ARGUS_PF_SEQ: 0-based sequence number; -1 otherwise */
    __s64 ret;       /* return value (rax) when ARGUS_PF_EXIT */
};

struct argus_call_str {
    struct argus_call call;
    char str[ARGUS_STR_LEN];
};

/* A c10d group, read at its first call since attach (seq 0) while the process lives, on the
 * calls ring just before that call's record: the Backend's first ARGUS_C10D_HEAD bytes and
 * the bytes its name (std::string pg_uid_: {char *data; size_t size} at ARGUS_C10D_NAME_OFF)
 * points at. User space checks the layout (argus/collect/c10d.py); a ring read after the rank
 * exited can no longer read its memory. */
#define ARGUS_C10D_HEAD 48
#define ARGUS_C10D_NAME_OFF 32
#define ARGUS_C10D_NAME_LEN 64  /* a power of two (the BPF read masks with it) */

struct argus_group_rec {
    __u32 type;      /* ARGUS_REC_GROUP */
    __u32 tgid;
    __u64 backend;   /* the c10d::Backend's address (args[seq_arg]) */
    __u8 head[ARGUS_C10D_HEAD];
    __u32 name_len;  /* bytes of name read: 0 when the size was out of range or unreadable */
    __u32 pad;
    __u8 name[ARGUS_C10D_NAME_LEN];
};

/* Process lifecycle, on its own ring buffer (low volume; never shares space with calls). */
#define ARGUS_PROC_FORK 1
#define ARGUS_PROC_EXEC 2
#define ARGUS_PROC_EXIT 3

struct argus_proc_event {
    __u32 type;      /* ARGUS_REC_PROC */
    __u32 what;      /* ARGUS_PROC_* */
    __u64 ts_ns;
    __u32 tgid;      /* the process (exec/exit) or the parent (fork) */
    __u32 child;     /* fork: the new task id */
    char comm[ARGUS_COMM_LEN];
};

/* Traced-process table value. */
#define ARGUS_W_TRACE (1u << 0)   /* probes and CPU samples of this tgid are recorded */
#define ARGUS_W_DESCEND (1u << 1) /* its children are watched too (launchers) */

/* Drop and error counters: index of the `drops` array map. */
#define ARGUS_DROP_CALL_RINGBUF 0
#define ARGUS_DROP_PROC_RINGBUF 1
#define ARGUS_DROP_DEPTH 2        /* nesting deeper than ARGUS_MAX_DEPTH */
#define ARGUS_DROP_RET_ORPHAN 3   /* a return with no matching entry, or entries whose
                                   * return was never seen (discarded when an outer call
                                   * returns) */
#define ARGUS_DROP_STACK_USER 4   /* failed user stack walk */
#define ARGUS_DROP_STACK_KERNEL 5 /* failed kernel stack walk */
#define ARGUS_DROP_STACK_MAP_FULL 6
#define ARGUS_DROP_COUNTS_FULL 7  /* a counts/seq/inflight hash map was full */
#define ARGUS_DROP_READ_FAULT 8   /* bpf_probe_read_user failed on a captured argument */
#define ARGUS_DROP_HOST_MAP_FULL 9 /* host.bpf.c: a host_counts/preempted/offcpu/blk map was full */
#define ARGUS_DROP_PY_WALK 10     /* a read failed walking a Python thread list or frame chain */
#define ARGUS_DROP_PY_MAP_FULL 11 /* py_stacks0/1 was full: the sample kept its native stack only */
#define ARGUS_NDROPS 12

/* CPU sample aggregation key. */
struct argus_stack_key {
    __u32 tgid;
    __u32 tid;
    __u64 user_stack_id;    /* key of stacks0/1 (the user frames), 0: none (a failed walk) */
    __u64 kernel_stack_id;  /* key of stacks0/1 (the kernel frames), 0: none (user mode) */
    char comm[ARGUS_COMM_LEN];
    __u64 py_stack_id;  /* key of py_stacks0/1 (the Python frames), 0: none */
};

/* Value of stacks0/1 (key: a hash of ip[]): one native stack of a CPU sample. */
#define ARGUS_NATIVE_DEPTH 127  /* frames kept, innermost first (perf_event_max_stack's default) */
struct argus_native_stack {
    __u32 len;                    /* bytes of ip[] bpf_get_stack wrote */
    __u32 pad;
    __u64 ip[ARGUS_NATIVE_DEPTH];
};

/* Python frames in CPU samples (cpu_stacks.bpf.c; argus/collect/cpython_walk.py finds and
 * validates the layout of one interpreter per process and writes its argus_py_proc). */
#define ARGUS_PY_DEPTH 32       /* Python frames kept per sample, innermost first */
#define ARGUS_PY_THREADS 32     /* thread states searched for the sampled thread */
#define ARGUS_PY_CFRAME (1u << 0)    /* ts_frame points to a _PyCFrame: + cframe_frame */
#define ARGUS_PY_PTHREAD (1u << 1)   /* ts_tid is pthread_self(): the tid is at +pthread_tid */
#define ARGUS_PY_IS_ENTRY (1u << 2)  /* byte frame_entry != 0: outermost frame of one C eval */
#define ARGUS_PY_OWNER (1u << 3)     /* byte frame_owner == 3 (FRAME_OWNED_BY_CSTACK): a shim */
#define ARGUS_PY_ALL_ENTRY (1u << 4) /* every frame is its own C eval call (3.10) */
#define ARGUS_PY_CODE_ENTRY 1ull     /* bit 0 of argus_py_stack.code[i]: an entry frame */

/* Value of py_procs (key: tgid): where the interpreter's structures are. */
struct argus_py_proc {
    __u64 runtime;        /* address of _PyRuntime in the process */
    __u32 version;        /* 0x030b for 3.11 (informational) */
    __u32 flags;          /* ARGUS_PY_* */
    __u32 interp_head;    /* _PyRuntime -> interpreters.head */
    __u32 threads_head;   /* PyInterpreterState -> first PyThreadState */
    __u32 ts_next;        /* PyThreadState -> next */
    __u32 ts_tid;         /* PyThreadState -> native_thread_id (or thread_id, ARGUS_PY_PTHREAD) */
    __u32 ts_frame;       /* PyThreadState -> frame / cframe / current_frame */
    __u32 cframe_frame;   /* _PyCFrame -> current_frame (ARGUS_PY_CFRAME) */
    __u32 frame_code;     /* frame -> code object */
    __u32 frame_prev;     /* frame -> the calling frame */
    __u32 frame_entry;    /* frame -> is_entry byte (ARGUS_PY_IS_ENTRY) */
    __u32 frame_owner;    /* frame -> owner byte (ARGUS_PY_OWNER) */
    __u32 pthread_tid;    /* glibc struct pthread -> tid (ARGUS_PY_PTHREAD) */
    __u32 pad;
};

/* Value of py_stacks0/1 (key: a hash of code[]): one Python stack. */
struct argus_py_stack {
    __u32 depth;          /* valid entries of code[] */
    __u32 truncated;      /* 1: the chain had more than ARGUS_PY_DEPTH frames */
    __u64 code[ARGUS_PY_DEPTH];  /* code object address | ARGUS_PY_CODE_ENTRY, innermost first */
};

/* py_stats: index -> samples (argus_py_* of the manifest's python_stacks). */
#define ARGUS_PY_STAT_WALKED 0    /* a Python stack was recorded */
#define ARGUS_PY_STAT_NO_THREAD 1 /* the sampled thread has no PyThreadState (native thread) */
#define ARGUS_PY_STAT_NO_FRAME 2  /* a thread state with no Python frame (idle, finalizing) */
#define ARGUS_PY_STAT_TRUNCATED 3 /* more than ARGUS_PY_DEPTH frames: innermost kept */
#define ARGUS_PY_NSTATS 4

/* Per-thread stack of calls waiting for their return probe. */
struct argus_frame {
    __u64 ts_ns;
    __u64 sp;        /* stack pointer at entry: the return sees sp + 8 (matches pairs) */
    __u64 args[ARGUS_MAX_ARGS];
    __u64 uid_hash;
    __s64 seq;
    __u32 probe_id;
    __u32 flags;
    __u8 out_arg;
    __u8 str_arg;
    __u8 pad[6];
};

struct argus_inflight {
    __u32 tgid;
    __u32 depth;
    struct argus_frame frames[ARGUS_MAX_DEPTH];
};

struct argus_seq_key {
    __u32 tgid;
    __s32 peer;    /* -1 for collectives */
    __u64 comm;
};

struct argus_count_key {
    __u32 tgid;
    __u32 probe_id;
};

/* Host context (host.bpf.c): what else on the node explains a slow or stuck rank. */
#define ARGUS_HOST_CPU 1    /* a traced thread waited runnable while `comm` ran (preempted) */
#define ARGUS_HOST_TCP 2    /* tcp:tcp_retransmit_skb; tgid 0 = not in a traced task's context */
#define ARGUS_HOST_OOM 3    /* oom:mark_victim: tgid = the victim, detail = ts_ns, comm = its name */
#define ARGUS_HOST_BLOCK 4  /* block_rq_issue -> block_rq_complete latency; detail = dev_t */
#define ARGUS_HOST_CPU_WAIT 5  /* runnable waits that began in one ARGUS_WAIT_BUCKET_NS slot:
                                  detail = the slot's start (ts_ns), comm = what ran instead;
                                  user space deletes the key once it has read it */
#define ARGUS_HOST_ON_CPU 6  /* a traced process's threads ran: total_ns = on-CPU time (switch
                                in -> out), count = switches out; detail 0, comm empty */

/* Key of host_counts (cumulative; user space takes deltas per interval). */
struct argus_host_key {
    __u32 kind;      /* ARGUS_HOST_* */
    __u32 tgid;      /* traced process (CPU, TCP), victim (OOM), 0 (node-wide) */
    __u64 detail;    /* TCP: dport << 32 | IPv4 daddr (network order); OOM: ts_ns; BLOCK: dev */
    char comm[ARGUS_COMM_LEN];  /* CPU: the competitor that ran instead; OOM: the victim */
};

struct argus_host_val {
    __u64 count;
    __u64 total_ns;  /* CPU: runnable wait; BLOCK: issue -> complete; else 0 */
};

/* A traced thread switched out while still runnable, waiting to run again. */
struct argus_preempt {
    __u64 ts_ns;
    __u32 tgid;
    __u32 woken;                /* 0: switched out runnable; 1: woken, not yet on a CPU */
    char comm[ARGUS_COMM_LEN];  /* what ran instead (next_comm; for a woken thread, filled
                                   at switch-in with the task that held the CPU) */
};

#define ARGUS_OFFCPU_USER_DEPTH 32
#define ARGUS_OFFCPU_KERNEL_DEPTH 16
#define ARGUS_OFFCPU_SCAN 32

/* The latest blocking (off-CPU) switch of one traced thread: key tid. */
struct argus_offcpu {
    __u64 ts_ns;      /* when it blocked */
    __u32 tgid;
    __s32 user_len;   /* bytes bpf_get_stack wrote to user[], or -errno */
    __s32 kernel_len; /* likewise kernel[] */
    __s32 scan_len;   /* bytes of scan[] read at the user stack pointer, or -errno */
    char comm[ARGUS_COMM_LEN];
    __u64 user[ARGUS_OFFCPU_USER_DEPTH];
    __u64 kernel[ARGUS_OFFCPU_KERNEL_DEPTH];
    __u64 scan[ARGUS_OFFCPU_SCAN];  /* words at the user sp: the return address a frameless
                                     * libc wrapper (pause, futex) hides from the FP walk */
    __u64 site;       /* where it blocked: user ip, user sp and syscall number, mixed */
    __u64 stack_ns;   /* when the stacks above were walked (ts_ns: a later block, same site) */
};

#endif /* ARGUS_H */
