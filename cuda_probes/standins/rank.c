/*
 * rank.c - argus-sim-rank: one rank of the simulated data-parallel (optionally pipeline-
 * parallel) training job. Started by argus/sim/launcher.py with torchrun's environment
 * (RANK, LOCAL_RANK, WORLD_SIZE, ...) plus ARGUS_SIM_* configuration.
 *
 * Each step: CPU data loading (data_loader_next_batch), H2D copy, forward kernels,
 * backward kernels with bucketed ncclAllReduce on a comm stream (events order the
 * streams), optimizer kernels, a blocking D2H loss read-back (pure DP: also one right
 * after forward, before backward, as loss.item() in real loops). Kernels are launched through
 * named host stubs (some with C++-mangled names) exactly like nvcc-generated code, a few
 * through the driver API (cuLaunchKernel) as cuBLAS does.
 *
 * With ARGUS_SIM_TP > 1 (tensor parallel, Megatron-shaped): ncclCommSplit makes a TP
 * communicator (ranks r / tp) and a DP one (ranks r % tp); every layer issues a TP
 * ncclAllReduce on the compute stream in forward and in backward, the gradient buckets go
 * to the DP communicator, and every 5th step an ncclAllGather + ncclBroadcast on the world
 * communicator (metrics). ARGUS_SIM_SYNC_EVERY = N > 1: the host reads the loss back only
 * every Nth step, so it runs ahead of the virtual GPU in between (no per-step host sync).
 * ARGUS_SIM_WAIT_AT = step: the go file is waited for after init and one warm-up step (the
 * communicators exist before a tracer attaches), not before the first CUDA call.
 *
 * Every CUDA/NCCL call goes through CALL(), which counts it on the caller side; the
 * stand-in libraries count the same calls on their side. Both go to the truth file
 * <ARGUS_SIM_JOB_DIR>/rank-<RANK>.json at exit or on SIGTERM/SIGINT.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "sim_cuda.h"
#include "sim_nccl.h"
#include "simgpu.h"

/* ------------------------------------------------------------ caller-side counts */
#define MAXNAMES 96
static const char *c_names[MAXNAMES];
static unsigned long long c_counts[MAXNAMES];
static int c_n;
static pthread_mutex_t c_lock = PTHREAD_MUTEX_INITIALIZER;

static int caller_slot(const char *name)
{
    pthread_mutex_lock(&c_lock);
    for (int i = 0; i < c_n; i++)
        if (strcmp(c_names[i], name) == 0) {
            pthread_mutex_unlock(&c_lock);
            return i;
        }
    int i = c_n < MAXNAMES ? c_n++ : MAXNAMES - 1;
    c_names[i] = name;
    pthread_mutex_unlock(&c_lock);
    return i;
}

#define CALL(fn, ...)                                                      \
    ({                                                                     \
        static int _slot = -1;                                             \
        if (_slot < 0)                                                     \
            _slot = caller_slot(#fn);                                      \
        __atomic_fetch_add(&c_counts[_slot], 1ULL, __ATOMIC_RELAXED);      \
        fn(__VA_ARGS__);                                                   \
    })

#define CK(x)                                                                          \
    do {                                                                               \
        int _e = (int)(x);                                                             \
        if (_e != 0) {                                                                 \
            fprintf(stderr, "argus-sim-rank %d: %s failed (%d) at line %d\n", g_rank, #x, \
                    _e, __LINE__);                                                     \
            exit(3);                                                                   \
        }                                                                              \
    } while (0)

/* ------------------------------------------------------------ configuration */
static int g_rank, g_local_rank, g_world, g_pp = 1, g_stage, g_dp;
static int g_steps = 50, g_kernels = 96, g_buckets = 4, g_log_every = 10;
static int g_tp = 1, g_layers = 4, g_sync_every = 1, g_wait_at_step, g_warmup_steps;
/* the host reads the loss back after the forward (and at the step's end: the default), or
 * at the step's end only (ARGUS_SIM_READBACK=end: after the collectives, so no rank's host
 * waits on its own GPU longer than its peers' do) */
static int g_readback_fwd = 1;
#define METRICS_EVERY 5 /* --tp: the world allgather + broadcast period */
static double g_duration_s, g_step_ms = 50.0, g_cpu_ms = 3.0, g_bucket_mb = 25.0;
static const char *g_jobdir;
static uint64_t g_t0;

#define MAXF 32
enum { F_STRAGGLER, F_HOST_STALL, F_LINK, F_HANG, F_JIT, F_BUBBLE, F_THROTTLE, F_GPU_STRAGGLER };
#define NKINDS 8
struct fault {
    int kind;
    unsigned long long ranks; /* bitmask */
    int start, steps;         /* steps < 0: until the end */
    double value, value2;
    long at;                  /* hang: collective index (value: 0 = DP comm, 1 = TP comm) */
};
static struct fault g_faults[MAXF];
static int g_nfaults;

static double env_d(const char *k, double d)
{
    const char *v = getenv(k);
    return (v && *v) ? atof(v) : d;
}

static int env_i(const char *k, int d)
{
    const char *v = getenv(k);
    return (v && *v) ? atoi(v) : d;
}

/* ARGUS_SIM_FAULTS: entries "kind:ranks=1+3,start=0,steps=-1,value=1.5,value2=0,at=-1"
 * separated by ';' (the launcher validates user specs and writes this normalised form). */
static void parse_faults(const char *spec)
{
    static const char *kinds[] = { "straggler", "host_stall", "link", "hang",
                                   "jit_stall", "bubble", "throttle", "gpu_straggler" };
    char *dup = strdup(spec ? spec : ""), *save = NULL;
    for (char *e = strtok_r(dup, ";", &save); e && g_nfaults < MAXF;
         e = strtok_r(NULL, ";", &save)) {
        char *colon = strchr(e, ':');
        if (!colon)
            continue;
        *colon = 0;
        struct fault f = { -1, 0, 0, -1, 0, 0, -1 };
        for (int k = 0; k < NKINDS; k++)
            if (strcmp(e, kinds[k]) == 0)
                f.kind = k;
        char *s2 = NULL;
        for (char *kv = strtok_r(colon + 1, ",", &s2); kv; kv = strtok_r(NULL, ",", &s2)) {
            char *eq = strchr(kv, '=');
            if (!eq)
                continue;
            *eq = 0;
            const char *v = eq + 1;
            if (!strcmp(kv, "ranks")) {
                char *s3 = NULL, *vd = strdup(v);
                for (char *r = strtok_r(vd, "+", &s3); r; r = strtok_r(NULL, "+", &s3))
                    if (atoi(r) >= 0 && atoi(r) < 64)
                        f.ranks |= 1ULL << atoi(r);
                free(vd);
            } else if (!strcmp(kv, "start")) f.start = atoi(v);
            else if (!strcmp(kv, "steps")) f.steps = atoi(v);
            else if (!strcmp(kv, "value")) f.value = atof(v);
            else if (!strcmp(kv, "value2")) f.value2 = atof(v);
            else if (!strcmp(kv, "at")) f.at = atol(v);
        }
        if (f.kind >= 0)
            g_faults[g_nfaults++] = f;
    }
    free(dup);
}

static int fault_mine(const struct fault *f) { return (f->ranks >> g_rank) & 1ULL; }
static int fault_active(const struct fault *f, int step)
{
    return fault_mine(f) && step >= f->start && (f->steps < 0 || step < f->start + f->steps);
}

/* ------------------------------------------------------------ truth */
static volatile int g_steps_done;
static volatile int g_hung;
static unsigned long long g_coll_world, g_coll_dp, g_coll_tp, g_p2p_send, g_p2p_recv;
static double *g_step_ms_list;
static pthread_mutex_t g_truth_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_truth_written;
/* GPU ground truth (written when the GPU agent's variables are set or a gpu_straggler fault
 * exists): the engine's op totals and the communicators' sequence numbers of the counted
 * steps (from step 0 on: after init and the warm-up step) */
static int g_gpu_truth;
static struct argus_sim_gpu_totals g_gpu_from;
static uint64_t g_seq_from[3];
static unsigned long long g_slowed_kernels;
static double g_slow_factor = 1.0;
static struct ncclComm *g_truth_comms[3];
static uint64_t g_comm_hash[3], g_seq_end[3];
static volatile int g_comms_gone; /* g_seq_end holds the final numbers */
static void write_gpu_truth(int fd);

static void write_truth(const char *how)
{
    pthread_mutex_lock(&g_truth_lock);
    if (g_truth_written || !g_jobdir) {
        pthread_mutex_unlock(&g_truth_lock);
        return;
    }
    g_truth_written = 1;
    char tmp[4096], path[4096];
    snprintf(path, sizeof path, "%s/rank-%d.json", g_jobdir, g_rank);
    snprintf(tmp, sizeof tmp, "%s/.rank-%d.json.tmp", g_jobdir, g_rank);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        pthread_mutex_unlock(&g_truth_lock);
        return;
    }
    dprintf(fd, "{\"rank\": %d, \"local_rank\": %d, \"tgid\": %d, \"stage\": %d, "
                "\"exit\": \"%s\", \"hung\": %s, \"steps_completed\": %d, ",
            g_rank, g_local_rank, (int)getpid(), g_stage, how, g_hung ? "true" : "false",
            g_steps_done);
    if (g_wait_at_step)
        dprintf(fd, "\"warmup_steps\": %d, ", g_warmup_steps);
    dprintf(fd, "\"collectives\": {\"world\": %llu%s", g_coll_world,
            (g_pp > 1 || g_tp > 1) ? ", " : "");
    if (g_tp > 1)
        dprintf(fd, "\"tp\": %llu, ", g_coll_tp);
    if (g_pp > 1 || g_tp > 1)
        dprintf(fd, "\"dp\": %llu", g_coll_dp);
    dprintf(fd, "}, \"p2p\": {\"send\": %llu, \"recv\": %llu}, ", g_p2p_send, g_p2p_recv);
    dprintf(fd, "\"step_time_ms\": [");
    for (int i = 0; i < g_steps_done; i++)
        dprintf(fd, "%s%.3f", i ? ", " : "", g_step_ms_list[i]);
    dprintf(fd, "], ");
    if (g_gpu_truth)
        write_gpu_truth(fd);
    dprintf(fd, "\"library_calls\": ");
    argus_sim_write_counts_json(fd);
    dprintf(fd, ", \"caller_calls\": {");
    for (int i = 0; i < c_n; i++)
        dprintf(fd, "%s\"%s\": %llu", i ? ", " : "", c_names[i],
                __atomic_load_n(&c_counts[i], __ATOMIC_RELAXED));
    dprintf(fd, "}}\n");
    close(fd);
    rename(tmp, path);
    pthread_mutex_unlock(&g_truth_lock);
}

/* "gpu": {"kernels": .., "kernel_ns": .., "copies": .., "copy_ns": .., "memsets": ..,
 *  "nccl_ops": .., "slowed_kernels": .., "slow_factor": .., "comms": {"world": {"hash": ..,
 *  "seq_from": .., "seq_end": ..}, ...}} for the counted steps */
static void write_gpu_truth(int fd)
{
    static const char *const cname[] = { "world", "dp", "tp" };
    struct argus_sim_gpu_totals t;
    argus_sim_gpu_totals(&t);
    dprintf(fd, "\"gpu\": {\"kernels\": %llu, \"kernel_ns\": %llu, \"copies\": %llu, "
                "\"copy_ns\": %llu, \"memsets\": %llu, \"nccl_ops\": %llu, "
                "\"slowed_kernels\": %llu, \"slow_factor\": %.6g, \"comms\": {",
            (unsigned long long)(t.kernels - g_gpu_from.kernels),
            (unsigned long long)(t.kernel_ns - g_gpu_from.kernel_ns),
            (unsigned long long)(t.copies - g_gpu_from.copies),
            (unsigned long long)(t.copy_ns - g_gpu_from.copy_ns),
            (unsigned long long)(t.memsets - g_gpu_from.memsets),
            (unsigned long long)(t.nccl_ops - g_gpu_from.nccl_ops), g_slowed_kernels,
            g_slow_factor);
    int first = 1;
    for (int i = 0; i < 3; i++) {
        if (!g_truth_comms[i])
            continue;
        uint64_t end = g_comms_gone ? g_seq_end[i]
                                    : argus_sim_comm_seq((argus_sim_comm *)g_truth_comms[i]);
        dprintf(fd, "%s\"%s\": {\"hash\": %llu, \"seq_from\": %llu, \"seq_end\": %llu}",
                first ? "" : ", ", cname[i], (unsigned long long)g_comm_hash[i],
                (unsigned long long)g_seq_from[i], (unsigned long long)end);
        first = 0;
    }
    dprintf(fd, "}}, ");
}

static void *signal_thread(void *arg)
{
    sigset_t *set = arg;
    int sig = 0;
    sigwait(set, &sig);
    write_truth("terminated");
    _exit(128 + sig);
    return NULL;
}

/* ------------------------------------------------------------ named host functions */
static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static volatile double g_sink;

static void cpu_busy(double ms)
{
    uint64_t end = mono_ns() + (uint64_t)(ms * 1e6);
    double x = 1.0;
    while (mono_ns() < end)
        for (int i = 0; i < 2000; i++)
            x = x * 1.0000001 + 1e-9;
    g_sink = x;
}

/* CPU-side data loading: decoding, augmentation, collation (CPU-busy). */
__attribute__((noinline)) void data_loader_next_batch(double ms)
{
    cpu_busy(ms);
    __asm__ volatile("" ::: "memory");
}

/* A one-off graph compilation (torch.compile / XLA style), CPU-busy. */
__attribute__((noinline)) void jit_compile_graph(double ms)
{
    cpu_busy(ms);
    __asm__ volatile("" ::: "memory");
}

/* A rank that stops forever before a collective (deadlock, lost peer, bug). */
__attribute__((noinline)) void sim_hang_wait(void)
{
    g_hung = 1;
    for (;;)
        pause();
}

/* ------------------------------------------------------------ kernel host stubs */
#define KERNEL_STUB(cname, sym)                                                        \
    __attribute__((noinline)) void cname(const float *in, float *out, int n, dim3 g,   \
                                         dim3 b, cudaStream_t s) __asm__(sym);          \
    __attribute__((noinline)) void cname(const float *in, float *out, int n, dim3 g,   \
                                         dim3 b, cudaStream_t s)                        \
    {                                                                                  \
        void *args[] = { &in, &out, &n };                                              \
        CK(CALL(cudaLaunchKernel, (const void *)cname, g, b, args, 0, s));             \
    }

KERNEL_STUB(k_embedding_fwd, "embedding_fwd_kernel")
KERNEL_STUB(k_layernorm_fwd, "_Z20layernorm_fwd_kernelPKfPfi")
KERNEL_STUB(k_flash_attn_fwd, "_Z21flash_attn_fwd_kernelPKfPfi")
KERNEL_STUB(k_cross_entropy, "_Z20cross_entropy_kernelPKfPfi")
KERNEL_STUB(k_gelu_bwd, "_Z15gelu_bwd_kernelPKfPfi")
KERNEL_STUB(k_softmax_bwd, "_Z18softmax_bwd_kernelPKfPfi")
KERNEL_STUB(k_matmul_bwd, "matmul_bwd_kernel")
KERNEL_STUB(k_grad_norm, "grad_norm_kernel")
KERNEL_STUB(k_fused_adam, "fused_adam_kernel")

/* launched through cudaLaunchKernelExC (as CUTLASS / launch attributes users do) */
__attribute__((noinline)) void k_rotary_fwd(const float *in, float *out, int n, dim3 g, dim3 b,
                                            cudaStream_t s) __asm__("_Z18rotary_embed_kernelPKfPfi");
__attribute__((noinline)) void k_rotary_fwd(const float *in, float *out, int n, dim3 g, dim3 b,
                                            cudaStream_t s)
{
    void *args[] = { &in, &out, &n };
    cudaLaunchConfig_t cfg = { g, b, 0, s, NULL, 0 };
    CK(CALL(cudaLaunchKernelExC, &cfg, (const void *)k_rotary_fwd, args));
}

typedef void (*stub_fn)(const float *, float *, int, dim3, dim3, cudaStream_t);
static stub_fn fwd_stubs[] = { k_embedding_fwd, k_layernorm_fwd, k_flash_attn_fwd,
                               k_layernorm_fwd, k_rotary_fwd };
static stub_fn bwd_stubs[] = { k_gelu_bwd, k_softmax_bwd, k_matmul_bwd, k_gelu_bwd };
static CUfunction g_sgemm_nn, g_sgemm_tn;

static const double weights[] = { 1.0, 0.6, 1.8, 0.8, 1.2, 0.4, 1.6, 0.6 };
static double g_unit_ns; /* ns per weight unit */
static float *d_in, *d_out, *d_loss, *d_grads;

static int g_pre_coll; /* a gpu_straggler slows the kernels launched while this is set */

static void launch_one(stub_fn fn, int i, cudaStream_t s)
{
    if (g_pre_coll)
        g_slowed_kernels++;
    uint64_t ns = (uint64_t)(weights[i % 8] * g_unit_ns);
    unsigned grid = (unsigned)((ns + 255) / 256);
    if (grid == 0)
        grid = 1;
    dim3 g = { grid, 1, 1 }, b = { 256, 1, 1 };
    if (i % 7 == 3) { /* every 7th kernel is a cuBLAS-style driver launch */
        CUfunction f = (i % 2) ? g_sgemm_nn : g_sgemm_tn;
        void *params[] = { &d_in, &d_out };
        CK(CALL(cuLaunchKernel, f, grid, 1, 1, 256, 1, 1, 0, (CUstream)s, params, NULL));
        return;
    }
    fn(d_in, d_out, 1024, g, b, s);
}

/* ------------------------------------------------------------ job helpers */
static void sleep_ms(double ms)
{
    struct timespec ts = { (time_t)(ms / 1000), (long)(fmod(ms, 1000.0) * 1e6) };
    nanosleep(&ts, NULL);
}

static int file_exists(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0;
}

static void write_file_atomic(const char *path, const void *data, size_t n)
{
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return;
    if (write(fd, data, n) != (ssize_t)n) {
        close(fd);
        return;
    }
    close(fd);
    rename(tmp, path);
}

/* The rendezvous of the ncclUniqueId, as torch's TCPStore does: the root writes it. */
static void exchange_uid(const char *name, int root, ncclUniqueId *id)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/uid-%s", g_jobdir, name);
    if (g_rank == root) {
        CK(CALL(ncclGetUniqueId, id));
        write_file_atomic(path, id, sizeof *id);
        return;
    }
    for (;;) {
        int fd = open(path, O_RDONLY);
        if (fd >= 0) {
            ssize_t n = read(fd, id, sizeof *id);
            close(fd);
            if (n == (ssize_t)sizeof *id)
                return;
        }
        sleep_ms(1);
    }
}

static int stop_step(void)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/stop", g_jobdir);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    char buf[32] = { 0 };
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    return n > 0 ? atoi(buf) : -1;
}

static ncclComm_t g_world_comm, g_dp_comm, g_tp_comm;
static cudaStream_t g_compute, g_comm;
static cudaEvent_t g_ev_bucket[64], g_ev_comm_done;
/* collectives issued on the data-parallel (0) and tensor-parallel (1) communicators since
 * the first counted step (the warm-up step of ARGUS_SIM_WAIT_AT=step is not counted) */
static long g_coll_index[2];

static void maybe_hang_before_collective(int comm)
{
    for (int i = 0; i < g_nfaults; i++)
        if (g_faults[i].kind == F_HANG && fault_mine(&g_faults[i]) &&
            (int)g_faults[i].value == comm && g_faults[i].at == g_coll_index[comm])
            sim_hang_wait();
}

static void tp_allreduce(size_t count)
{
    maybe_hang_before_collective(1);
    /* in the layer's data path: on the compute stream, as Megatron's TP allreduces */
    CK(CALL(ncclAllReduce, d_out, d_out, count, ncclBfloat16, ncclSum, g_tp_comm, g_compute));
    g_coll_index[1]++;
    g_coll_tp++;
}

static void dp_allreduce(size_t count)
{
    maybe_hang_before_collective(0);
    CK(CALL(ncclAllReduce, d_grads, d_grads, count, ncclBfloat16, ncclSum, g_dp_comm, g_comm));
    g_coll_index[0]++;
    if (g_dp_comm == g_world_comm)
        g_coll_world++;
    else
        g_coll_dp++;
}

static void p2p(int is_send, int peer, size_t count)
{
    CK(CALL(ncclGroupStart));
    if (is_send) {
        CK(CALL(ncclSend, d_out, count, ncclBfloat16, peer, g_world_comm, g_compute));
        g_p2p_send++;
    } else {
        CK(CALL(ncclRecv, d_in, count, ncclBfloat16, peer, g_world_comm, g_compute));
        g_p2p_recv++;
    }
    CK(CALL(ncclGroupEnd));
}

static double g_base_gpu = 1.0, g_pre_factor = 1.0;

static void apply_faults(int step, double *stall_ms, double *jit_ms)
{
    double gpu = 1.0, link = 1.0;
    g_pre_factor = 1.0;
    unsigned mhz = 0;
    unsigned long long reasons = 0;
    *stall_ms = 0;
    *jit_ms = 0;
    for (int i = 0; i < g_nfaults; i++) {
        struct fault *f = &g_faults[i];
        if (!fault_active(f, step))
            continue;
        switch (f->kind) {
        case F_STRAGGLER:
        case F_BUBBLE: gpu /= f->value; break;
        case F_HOST_STALL: *stall_ms += f->value; break;
        case F_LINK: link /= f->value; break;
        case F_JIT: *jit_ms += f->value; break;
        case F_THROTTLE:
            mhz = (unsigned)f->value;
            reasons = (unsigned long long)f->value2;
            break;
        case F_GPU_STRAGGLER: g_pre_factor *= f->value; break;
        }
    }
    g_base_gpu = gpu;
    static double last_gpu = 1.0, last_link = 1.0;
    static unsigned last_mhz = 0;
    if (gpu != last_gpu)
        argus_sim_set_gpu_speed(gpu);
    if (link != last_link)
        argus_sim_set_link_speed(link);
    if (mhz != last_mhz)
        argus_sim_set_clock_mhz(mhz ? mhz : argus_sim_max_clock_mhz(), reasons);
    last_gpu = gpu;
    last_link = link;
    last_mhz = mhz;
}

/* ------------------------------------------------------------ one training step */
static int g_nfwd, g_nbwd, g_nopt, g_micro = 4;
static size_t g_bucket_count;
static float g_loss;

/* whether this step ends with the host reading the loss back (every step by default) */
static int host_syncs(int step)
{
    return g_sync_every <= 1 || step < 0 || (step + 1) % g_sync_every == 0;
}

static void enqueue_bucket(int b, size_t count)
{
    CK(CALL(cudaEventRecord, g_ev_bucket[b], g_compute));
    CK(CALL(cudaStreamWaitEvent, g_comm, g_ev_bucket[b], 0));
    dp_allreduce(count);
}

/* step < 0: the warm-up step of ARGUS_SIM_WAIT_AT=step (no fault is active in it) */
static void run_step(int step)
{
    int nfwd = g_nfwd, nbwd = g_nbwd, nopt = g_nopt;
    double stall_ms, jit_ms;
    apply_faults(step, &stall_ms, &jit_ms);
    /* gpu_straggler: the compute kernels before the step's gradient collectives complete
     * (forward, backward) run F times longer; the optimizer's after them do not */
    if (g_pre_factor != 1.0) {
        argus_sim_set_gpu_speed(g_base_gpu / g_pre_factor);
        g_slow_factor = g_pre_factor;
        g_pre_coll = 1;
    }
    data_loader_next_batch(g_cpu_ms + stall_ms);
    if (jit_ms > 0)
        jit_compile_graph(jit_ms);
    CK(CALL(cudaMemcpyAsync, d_in, d_out, (size_t)8 << 20, cudaMemcpyHostToDevice, g_compute));
    int sync = host_syncs(step);

    if (g_tp > 1) {
        /* Megatron-shaped: per layer the TP allreduce of the row-parallel output (forward)
         * and of the column-parallel input grad (backward), on the compute stream */
        int per_f = nfwd / g_layers > 0 ? nfwd / g_layers : 1;
        int per_b = nbwd / g_layers > 0 ? nbwd / g_layers : 1;
        size_t act = (size_t)2 << 20; /* 4 MB of bf16 activations */
        for (int l = 0; l < g_layers; l++) {
            for (int i = 0; i < per_f; i++)
                launch_one(fwd_stubs[i % 5], l * per_f + i, g_compute);
            tp_allreduce(act);
        }
        launch_one(k_cross_entropy, 2, g_compute);
        if (sync && g_readback_fwd)
            CK(CALL(cudaMemcpy, &g_loss, d_loss, sizeof g_loss, cudaMemcpyDeviceToHost));
        int b = 0;
        for (int l = 0; l < g_layers; l++) {
            for (int i = 0; i < per_b; i++)
                launch_one(bwd_stubs[i % 4], nfwd + l * per_b + i, g_compute);
            tp_allreduce(act);
            for (int target = (l + 1) * g_buckets / g_layers; b < target; b++)
                enqueue_bucket(b, g_bucket_count / g_tp);
        }
        for (; b < g_buckets; b++)
            enqueue_bucket(b, g_bucket_count / g_tp);
    } else if (g_pp == 1) {
        for (int i = 0; i < nfwd; i++)
            launch_one(fwd_stubs[i % 5], i, g_compute);
        launch_one(k_cross_entropy, 2, g_compute);
        /* loss.item() after forward (logging, NaN/inf check): a blocking read-back that
         * waits for this rank's OWN forward only (no collective is pending yet), as most
         * real training loops do; it is what makes a GPU-slow rank visible host-side. */
        if (sync && g_readback_fwd)
            CK(CALL(cudaMemcpy, &g_loss, d_loss, sizeof g_loss, cudaMemcpyDeviceToHost));
        int per = nbwd / g_buckets;
        for (int b = 0; b < g_buckets; b++) {
            int n = (b == g_buckets - 1) ? nbwd - per * b : per;
            for (int i = 0; i < n; i++)
                launch_one(bwd_stubs[i % 4], nfwd + per * b + i, g_compute);
            enqueue_bucket(b, g_bucket_count);
        }
    } else {
        /* GPipe-like: all forward micro-batches, then all backward ones */
        int prev = g_rank - 1, next = g_rank + 1, micro = g_micro;
        int per_mb_f = nfwd / micro > 0 ? nfwd / micro : 1;
        int per_mb_b = nbwd / micro > 0 ? nbwd / micro : 1;
        size_t act = (size_t)4 << 20;
        for (int m = 0; m < micro; m++) {
            if (g_stage > 0)
                p2p(0, prev, act);
            for (int i = 0; i < per_mb_f; i++)
                launch_one(fwd_stubs[i % 5], i, g_compute);
            if (g_stage < g_pp - 1)
                p2p(1, next, act);
        }
        if (g_stage == g_pp - 1)
            launch_one(k_cross_entropy, 2, g_compute);
        for (int m = 0; m < micro; m++) {
            if (g_stage < g_pp - 1)
                p2p(0, next, act);
            for (int i = 0; i < per_mb_b; i++)
                launch_one(bwd_stubs[i % 4], nfwd + i, g_compute);
            if (g_stage > 0)
                p2p(1, prev, act);
        }
        for (int b = 0; b < g_buckets; b++)
            enqueue_bucket(b, g_bucket_count / g_pp);
    }
    if (g_pre_coll) {
        argus_sim_set_gpu_speed(g_base_gpu);
        g_pre_coll = 0;
    }
    CK(CALL(cudaEventRecord, g_ev_comm_done, g_comm));
    CK(CALL(cudaStreamWaitEvent, g_compute, g_ev_comm_done, 0));
    launch_one(k_grad_norm, 1, g_compute);
    for (int i = 1; i < nopt; i++)
        launch_one(k_fused_adam, nfwd + nbwd + i, g_compute);
    if (g_tp > 1 && step >= 0 && step % METRICS_EVERY == METRICS_EVERY - 1) {
        /* metrics: every rank's loss gathered, rank 0's decision (stop?) broadcast */
        CK(CALL(ncclAllGather, d_loss, d_out, 1, ncclFloat32, g_world_comm, g_compute));
        CK(CALL(ncclBroadcast, d_loss, d_loss, 1, ncclFloat32, 0, g_world_comm, g_compute));
        g_coll_world += 2;
    }
    if (sync)
        CK(CALL(cudaMemcpy, &g_loss, d_loss, sizeof g_loss, cudaMemcpyDeviceToHost));
}

/* announce readiness, then wait for the go file */
static void announce_and_wait_go(void)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/ready-%d", g_jobdir, g_rank);
    char pidbuf[32];
    int pl = snprintf(pidbuf, sizeof pidbuf, "%d\n", (int)getpid());
    write_file_atomic(path, pidbuf, (size_t)pl);
    const char *go = getenv("ARGUS_SIM_WAIT_GO");
    if (go && *go)
        while (!file_exists(go))
            sleep_ms(2);
}

/* ------------------------------------------------------------ main */
int main(void)
{
    g_rank = env_i("RANK", 0);
    g_local_rank = env_i("LOCAL_RANK", 0);
    g_world = env_i("WORLD_SIZE", 1);
    g_jobdir = getenv("ARGUS_SIM_JOB_DIR");
    g_steps = env_i("ARGUS_SIM_STEPS", 50);
    g_duration_s = env_d("ARGUS_SIM_DURATION_S", 0);
    g_kernels = env_i("ARGUS_SIM_KERNELS", 96);
    g_step_ms = env_d("ARGUS_SIM_STEP_MS", 50.0);
    g_cpu_ms = env_d("ARGUS_SIM_CPU_MS", 3.0);
    g_buckets = env_i("ARGUS_SIM_BUCKETS", 4);
    g_bucket_mb = env_d("ARGUS_SIM_BUCKET_MB", 25.0);
    g_pp = env_i("ARGUS_SIM_PP", 1);
    g_log_every = env_i("ARGUS_SIM_LOG_EVERY", 10);
    g_tp = env_i("ARGUS_SIM_TP", 1);
    g_layers = env_i("ARGUS_SIM_LAYERS", 4);
    g_sync_every = env_i("ARGUS_SIM_SYNC_EVERY", 1);
    const char *readback = getenv("ARGUS_SIM_READBACK");
    g_readback_fwd = !(readback && strcmp(readback, "end") == 0);
    const char *wait_at = getenv("ARGUS_SIM_WAIT_AT");
    g_wait_at_step = wait_at && strcmp(wait_at, "step") == 0;
    parse_faults(getenv("ARGUS_SIM_FAULTS"));
    if (!g_jobdir || g_world < 1 || g_pp < 1 || g_world % g_pp != 0 || g_kernels < 8 ||
        g_buckets < 1 || g_buckets > 64 || g_tp < 1 || g_world % g_tp != 0 ||
        (g_tp > 1 && g_pp > 1) || g_layers < 1 || g_sync_every < 1) {
        fprintf(stderr, "argus-sim-rank: bad configuration (run it through scripts/simulate)\n");
        return 2;
    }
    g_dp = g_world / g_pp;
    g_stage = g_rank % g_pp;
    int max_steps = g_duration_s > 0 ? (g_steps > 0 ? g_steps : 1 << 30) : g_steps;
    g_step_ms_list = calloc((size_t)(max_steps < 100000 ? max_steps : 100000) + 1, sizeof(double));

    /* signals: one thread takes SIGTERM/SIGINT/SIGHUP and writes the truth */
    static sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    pthread_t st;
    pthread_create(&st, NULL, signal_thread, &set);
    /* like torchrun's workers: die (writing the truth) when the launcher dies */
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() == 1)
        kill(getpid(), SIGTERM);

    /* by default: wait for the go file without touching CUDA */
    if (!g_wait_at_step)
        announce_and_wait_go();

    g_t0 = mono_ns();
    /* ---- init, like torch.distributed + DDP ---- */
    CK(CALL(cudaSetDevice, g_local_rank));
    int ndev = 0, ver = 0, dev = -1;
    CK(CALL(cudaGetDeviceCount, &ndev));
    CK(CALL(cudaGetDevice, &dev));
    CK(CALL(cudaRuntimeGetVersion, &ver));
    CK(CALL(cudaDriverGetVersion, &ver));
    CK(CALL(cuInit, 0));
    CK(CALL(cuDriverGetVersion, &ver));
    CK(CALL(cuDeviceGetCount, &ndev));
    CK(CALL(ncclGetVersion, &ver));
    CUmodule mod;
    CK(CALL(cuModuleLoadData, &mod, "sim-cubin"));
    CK(CALL(cuModuleGetFunction, &g_sgemm_nn, mod, "ampere_sgemm_128x64_nn"));
    CK(CALL(cuModuleGetFunction, &g_sgemm_tn, mod, "ampere_sgemm_64x64_tn"));

    size_t param_bytes = (size_t)(g_bucket_mb * g_buckets * 1048576.0);
    CK(CALL(cudaMalloc, (void **)&d_grads, param_bytes));
    CK(CALL(cudaMalloc, (void **)&d_in, (size_t)256 << 20));
    CK(CALL(cudaMalloc, (void **)&d_out, (size_t)256 << 20));
    CK(CALL(cudaMalloc, (void **)&d_loss, 4));
    CK(CALL(cudaStreamCreate, &g_compute));
    CK(CALL(cudaStreamCreateWithFlags, &g_comm, cudaStreamNonBlocking));
    for (int b = 0; b < g_buckets; b++)
        CK(CALL(cudaEventCreateWithFlags, &g_ev_bucket[b], 0x02 /* DisableTiming */));
    CK(CALL(cudaEventCreate, &g_ev_comm_done));

    ncclUniqueId id;
    exchange_uid("world", 0, &id);
    ncclConfig_t *cfg = NULL;
    if (g_rank % 2 == 0)
        CK(CALL(ncclCommInitRank, &g_world_comm, g_world, id, g_rank));
    else
        CK(CALL(ncclCommInitRankConfig, &g_world_comm, g_world, id, g_rank, cfg));
    int cnt = 0, me = 0, cdev = 0;
    ncclResult_t async_err;
    CK(CALL(ncclCommCount, g_world_comm, &cnt));
    CK(CALL(ncclCommUserRank, g_world_comm, &me));
    CK(CALL(ncclCommCuDevice, g_world_comm, &cdev));
    CK(CALL(ncclCommGetAsyncError, g_world_comm, &async_err));
    if (g_pp > 1) {
        CK(CALL(ncclCommSplit, g_world_comm, g_stage, g_rank, &g_dp_comm, NULL));
    } else if (g_tp > 1) {
        /* tensor-parallel groups of consecutive ranks, data-parallel across them */
        CK(CALL(ncclCommSplit, g_world_comm, g_rank / g_tp, g_rank, &g_tp_comm, NULL));
        CK(CALL(ncclCommSplit, g_world_comm, g_rank % g_tp, g_rank, &g_dp_comm, NULL));
    } else {
        g_dp_comm = g_world_comm;
    }

    /* DDP broadcasts the initial parameters from rank 0 */
    CK(CALL(ncclBroadcast, d_grads, d_grads, 1 << 20, ncclFloat32, 0, g_world_comm, g_comm));
    g_coll_world++;
    CK(CALL(cudaStreamSynchronize, g_comm));
    /* warm-up on the per-thread default stream (a --default-stream per-thread caller) */
    {
        dim3 g = { 64, 1, 1 }, b = { 256, 1, 1 };
        cudaLaunchConfig_t lc = { g, b, 0, cudaStreamPerThread, NULL, 0 };
        void *args[] = { &d_in };
        CK(CALL(cudaLaunchKernel_ptsz, (const void *)k_layernorm_fwd, g, b, args, 0, NULL));
        CK(CALL(cudaLaunchKernelExC_ptsz, &lc, (const void *)k_layernorm_fwd, args));
        CK(CALL(cudaMemcpyAsync_ptsz, d_in, d_out, 4096, cudaMemcpyDeviceToDevice, NULL));
        CK(CALL(cudaStreamSynchronize_ptsz, NULL));
        static unsigned long long graph_ns = 200000; /* a captured 0.2 ms graph */
        CK(CALL(cudaGraphLaunch, (cudaGraphExec_t)&graph_ns, g_compute));
        if (CALL(cudaEventQuery, g_ev_comm_done) != cudaSuccess)
            CK(CALL(cudaGetLastError));
        (void)CALL(cudaGetErrorString, cudaSuccess);
        CK(CALL(cudaDeviceSynchronize));
    }

    /* kernel plan: g_kernels per step, GPU time ~g_step_ms at speed 1 */
    g_nfwd = g_kernels * 35 / 100;
    g_nopt = g_kernels * 15 / 100;
    g_nbwd = g_kernels - g_nfwd - g_nopt;
    double wsum = 0;
    for (int i = 0; i < g_kernels; i++)
        wsum += weights[i % 8];
    g_unit_ns = g_step_ms * 1e6 / wsum;
    g_bucket_count = (size_t)(g_bucket_mb * 1048576.0 / 2);

    if (g_wait_at_step) {
        /* the communicators exist and one step ran before a tracer attaches (the usual
         * case: jobs are traced long after their start); its collectives are not counted
         * for the hang faults' indices */
        run_step(-1);
        g_warmup_steps = 1;
        g_coll_index[0] = g_coll_index[1] = 0;
        announce_and_wait_go();
        g_t0 = mono_ns();
    }

    /* the GPU truth counts from here: step 0 on */
    const char *inj = getenv("CUDA_INJECTION64_PATH"), *plug = getenv("NCCL_PROFILER_PLUGIN");
    for (int i = 0; i < g_nfaults; i++)
        if (g_faults[i].kind == F_GPU_STRAGGLER)
            g_gpu_truth = 1;
    if ((inj && *inj) || (plug && *plug))
        g_gpu_truth = 1;
    if (g_gpu_truth) {
        g_truth_comms[0] = g_world_comm;
        g_truth_comms[1] = g_dp_comm != g_world_comm ? g_dp_comm : NULL;
        g_truth_comms[2] = g_tp_comm;
        for (int i = 0; i < 3; i++)
            if (g_truth_comms[i])
                g_seq_from[i] = argus_sim_comm_seq((argus_sim_comm *)g_truth_comms[i]),
                g_comm_hash[i] = argus_sim_comm_hash((argus_sim_comm *)g_truth_comms[i]);
        argus_sim_gpu_totals(&g_gpu_from);
        g_slowed_kernels = 0;
    }

    char stop_path[4200];
    snprintf(stop_path, sizeof stop_path, "%s/stop", g_jobdir);
    int stop_at = -1;
    for (int step = 0; step < max_steps; step++) {
        if (g_duration_s > 0) {
            if (g_rank == 0 && stop_at < 0 && (mono_ns() - g_t0) / 1e9 >= g_duration_s) {
                char buf[32];
                int n = snprintf(buf, sizeof buf, "%d\n", step + 2);
                write_file_atomic(stop_path, buf, (size_t)n);
            }
            if (stop_at < 0)
                stop_at = stop_step();
            if (stop_at >= 0 && step >= stop_at)
                break;
        }
        uint64_t t_step = mono_ns();
        run_step(step);
        double ms = (mono_ns() - t_step) / 1e6;
        if (g_steps_done < 100000)
            g_step_ms_list[g_steps_done] = ms;
        g_steps_done++;
        if (g_log_every > 0 && (step + 1) % g_log_every == 0)
            fprintf(stderr, "[rank %d] step %d step_time_ms %.1f loss %.4f\n", g_rank, step + 1,
                    ms, g_loss);
    }

    CK(CALL(cudaDeviceSynchronize));
    for (int i = 0; i < 3; i++)
        if (g_truth_comms[i])
            g_seq_end[i] = argus_sim_comm_seq((argus_sim_comm *)g_truth_comms[i]);
    g_comms_gone = 1;
    CK(CALL(cudaFree, d_in));
    CK(CALL(cudaFree, d_out));
    CK(CALL(cudaFree, d_loss));
    CK(CALL(cudaFree, d_grads));
    for (int b = 0; b < g_buckets; b++)
        CK(CALL(cudaEventDestroy, g_ev_bucket[b]));
    CK(CALL(cudaEventDestroy, g_ev_comm_done));
    CK(CALL(cudaStreamDestroy, g_compute));
    CK(CALL(cudaStreamDestroy, g_comm));
    if (g_tp_comm)
        CK(CALL(ncclCommDestroy, g_tp_comm));
    if (g_dp_comm != g_world_comm)
        CK(CALL(ncclCommDestroy, g_dp_comm));
    CK(CALL(ncclCommDestroy, g_world_comm));
    write_truth("completed");
    return 0;
}
