/*
 * simgpu.h - the API of libargus_simgpu.so, the per-process virtual GPU engine that the
 * stand-in libcudart / libcuda / libnccl share, and the device-state file layout that
 * libnvidia-ml reads from another process.
 *
 * Only argus_sim_* names are exported by the engine: a uprobe on a CUDA or NCCL name
 * therefore fires once per call made by the program, never for a call made internally.
 */
#ifndef ARGUS_SIMGPU_H
#define ARGUS_SIMGPU_H

#include <stddef.h>
#include <stdint.h>

#define ARGUS_EXPORT __attribute__((visibility("default"), noinline))

/* Count one call of an exported entry point (truth counters, one atomic per symbol).
 * Taking the frame address makes even a leaf function set up %rbp, so that every exported
 * entry point starts with `push %rbp` (uprobe emulated, not single-stepped). */
#define ARGUS_COUNT(tab, idx)                                                   \
    do {                                                                        \
        __asm__ volatile("" ::"r"(__builtin_frame_address(0)));                 \
        __atomic_fetch_add(&(tab)[(idx)], 1ULL, __ATOMIC_RELAXED);              \
    } while (0)
#define ARGUS_FRAME() __asm__ volatile("" ::"r"(__builtin_frame_address(0)))

#ifdef __cplusplus
extern "C" {
#endif

typedef struct argus_sim_stream argus_sim_stream;
typedef struct argus_sim_event argus_sim_event;
typedef struct argus_sim_comm argus_sim_comm;

/* ---- registration of per-library call counters (dumped into the truth file) ---- */
void argus_sim_register_counters(const char *lib, const char *const *names,
                                 unsigned long long *counts, int n);
/* Writes {"libcudart.so.12": {"cudaLaunchKernel": 12, ...}, ...} to fd. */
void argus_sim_write_counts_json(int fd);

/* ---- devices ---- */
int argus_sim_device_count(void);
int argus_sim_set_device(int dev);
int argus_sim_get_device(void);

/* ---- memory (fake device addresses; only the byte count is tracked) ---- */
void *argus_sim_mem_alloc(size_t bytes);
int argus_sim_mem_free(void *p);

/* ---- streams: handle 0 = legacy default stream, 2 = per-thread default stream ---- */
argus_sim_stream *argus_sim_stream_create(int nonblocking);
argus_sim_stream *argus_sim_stream_resolve(void *handle, int per_thread_default);
int argus_sim_stream_destroy(argus_sim_stream *s);
/* threads: launched threads (grid * block); 1 thread = 1 ns at speed 1.0 and max clock */
void argus_sim_enqueue_kernel(argus_sim_stream *s, uint64_t threads);
void argus_sim_enqueue_copy(argus_sim_stream *s, uint64_t bytes);
void argus_sim_enqueue_delay(argus_sim_stream *s, uint64_t ns);
void argus_sim_stream_sync(argus_sim_stream *s);
int argus_sim_stream_idle(argus_sim_stream *s);
void argus_sim_device_sync(void);

/* ---- events ---- */
argus_sim_event *argus_sim_event_create(void);
void argus_sim_event_destroy(argus_sim_event *e);
void argus_sim_event_record(argus_sim_event *e, argus_sim_stream *s);
void argus_sim_stream_wait_event(argus_sim_stream *s, argus_sim_event *e);
void argus_sim_event_sync(argus_sim_event *e);
int argus_sim_event_done(argus_sim_event *e);

/* ---- communicators (cross-process, shared memory keyed by the 128-byte unique id) ---- */
void argus_sim_unique_id(unsigned char id[128]);
/* Blocks until all nranks ranks have joined. NULL on error. */
argus_sim_comm *argus_sim_comm_init(const unsigned char id[128], int nranks, int rank, int dev);
argus_sim_comm *argus_sim_comm_split(argus_sim_comm *parent, int color, int key);
void argus_sim_comm_destroy(argus_sim_comm *c);
int argus_sim_comm_nranks(argus_sim_comm *c);
int argus_sim_comm_rank(argus_sim_comm *c);
int argus_sim_comm_device(argus_sim_comm *c);
enum { ARGUS_COLL_ALLREDUCE, ARGUS_COLL_ALLGATHER, ARGUS_COLL_REDUCESCATTER,
       ARGUS_COLL_BROADCAST, ARGUS_COLL_REDUCE, ARGUS_P2P_SEND, ARGUS_P2P_RECV };
/* bytes: for collectives the full buffer size (allgather: the gathered size). */
void argus_sim_enqueue_nccl(argus_sim_comm *c, int kind, uint64_t bytes, int peer,
                            argus_sim_stream *s);
void argus_sim_group_start(void);
void argus_sim_group_end(void);

/* ---- activity hooks (the stand-in libcupti and libnccl's profiler plugin support) ----
 * Without a hook set the engine behaves exactly as without these calls. */
enum { ARGUS_SIM_ACT_KERNEL = 1, ARGUS_SIM_ACT_MEMCPY, ARGUS_SIM_ACT_MEMSET, ARGUS_SIM_ACT_NCCL };
struct argus_sim_activity {
    int kind;                /* ARGUS_SIM_ACT_* */
    uint32_t stream_id;      /* per-process stream number, 1.. */
    uint32_t correlation_id; /* per-process op number, 1.. */
    uint32_t device;
    uint64_t start_ns, end_ns; /* the simulated GPU clock (CLOCK_MONOTONIC ns) */
    uint64_t bytes;          /* memcpy / memset / NCCL bytes */
    uint64_t threads;        /* kernels: launched threads */
    const void *func;        /* kernels launched through the runtime: the host stub */
    const char *name;        /* kernel or NCCL kernel name when known, else NULL */
};
typedef void (*argus_sim_activity_fn)(const struct argus_sim_activity *a);
/* Called once per kernel / copy / memset when its device times are fixed (with the engine
 * lock held: the hook must not call back into the engine), and once per NCCL op (group)
 * when it completes (from the stream's worker thread, no lock held). */
void argus_sim_set_activity_hook(argus_sim_activity_fn fn);
/* done(user, start, end): one NCCL part (collective or p2p) ran from start to end on this
 * GPU; called from the stream's worker thread. */
typedef void (*argus_sim_nccl_done_fn)(void *user, uint64_t start_ns, uint64_t end_ns);
void argus_sim_enqueue_nccl_ex(argus_sim_comm *c, int kind, uint64_t bytes, int peer,
                               argus_sim_stream *s, argus_sim_nccl_done_fn done, void *user);
void argus_sim_enqueue_kernel_ex(argus_sim_stream *s, uint64_t threads, const void *func);
void argus_sim_enqueue_memset(argus_sim_stream *s, uint64_t bytes);
/* the communicator's hash (of its unique id, as NCCL's commHash) and the sequence number
 * its next collective gets */
uint64_t argus_sim_comm_hash(argus_sim_comm *c);
uint64_t argus_sim_comm_seq(argus_sim_comm *c);
/* totals of this process's GPU ops so far (the truth for the GPU agent tests) */
struct argus_sim_gpu_totals {
    uint64_t kernels, kernel_ns, copies, copy_ns, memsets, nccl_ops;
};
void argus_sim_gpu_totals(struct argus_sim_gpu_totals *out);

/* ---- control API for fault injection ---- */
void argus_sim_set_gpu_speed(double factor);      /* 0.5 = kernels take twice as long */
void argus_sim_set_link_speed(double factor);     /* 0.5 = collectives cost twice as much */
void argus_sim_set_clock_mhz(unsigned sm_mhz, unsigned long long throttle_reasons);
unsigned argus_sim_max_clock_mhz(void);
uint64_t argus_sim_now_ns(void);

#ifdef __cplusplus
}
#endif

/* ---- device state file: /dev/shm/argus-sim-<node>-gpu<i>, written by the rank process
 *      that owns device i, read by libnvidia-ml in any process ---- */
#define ARGUS_DEV_MAGIC 0x41524753494d4750ULL /* "ARGSIMGP" */
#define ARGUS_DEV_BUCKETS 100                 /* 100 x 10 ms = utilisation over 1 s */
#define ARGUS_DEV_BUCKET_NS 10000000ULL
struct argus_dev_state {
    uint64_t magic;
    int32_t tgid;           /* owner; 0 or dead = idle device */
    uint32_t index;
    uint32_t sm_clock_mhz;
    uint32_t max_sm_clock_mhz;
    uint32_t mem_clock_mhz;
    uint32_t max_mem_clock_mhz;
    uint64_t throttle_reasons;
    uint64_t mem_used_bytes;
    uint64_t mem_total_bytes;
    uint64_t updated_ns;    /* CLOCK_MONOTONIC */
    uint64_t bucket_idx[ARGUS_DEV_BUCKETS];
    uint64_t busy_ns[ARGUS_DEV_BUCKETS];
};
#define ARGUS_SIM_MAX_SM_MHZ 1980
#define ARGUS_SIM_MEM_MHZ 2619
#define ARGUS_SIM_MEM_TOTAL (80ULL << 30)

#endif
