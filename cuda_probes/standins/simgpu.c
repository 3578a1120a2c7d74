/*
 * simgpu.c - libargus_simgpu.so: the per-process virtual GPU shared by the stand-in
 * libcudart.so.12, libcuda.so.1 and libnccl.so.2.
 *
 * Model (all times CLOCK_MONOTONIC, real time):
 *  - A stream is a FIFO of ops. Each op gets a start = max(end of the previous op on the
 *    stream, time it was enqueued, its dependencies) and an end = start + duration. Ops
 *    whose times are computable at once (kernels, copies, event records, waits on events
 *    already scheduled) are scheduled inline by the enqueueing call, which returns at
 *    once. Ops that must wait (a wait on an event not yet scheduled, an NCCL op whose peers
 *    have not arrived) go to the stream's worker thread, and every later op of that stream
 *    queues behind them.
 *  - Host synchronisation (stream/device/event sync, blocking memcpy) waits (condition
 *    variable, then clock_nanosleep) until every op enqueued before the call has ended.
 *  - NCCL ops publish their arrival (their start) in a shared-memory file per
 *    communicator, keyed by the 128-byte unique id; the op ends at
 *    max(arrivals of all ranks) + cost(kind, bytes, nranks) x slowest link factor.
 *    Waiting is a futex on the shared file (sleeping, never spinning).
 *  - The legacy default stream (handle 0) synchronises with all blocking streams, as in
 *    CUDA: ops on it wait for prior work on blocking streams and vice versa.
 *  - The device state (clock, throttle reasons, memory, busy time per 10 ms) is published
 *    in /dev/shm/argus-sim-<ARGUS_SIM_NODE>-gpu<i> for the stand-in libnvidia-ml.
 */
#define _GNU_SOURCE
#include "simgpu.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define HIDDEN __attribute__((visibility("hidden")))
#define MAXR 64
#define NSLOTS 64
#define P2PSLOTS 16

/* ------------------------------------------------------------------ time */
uint64_t ARGUS_EXPORT argus_sim_now_ns(void)
{
    ARGUS_FRAME();
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void sleep_until(uint64_t t)
{
    struct timespec ts = { (time_t)(t / 1000000000ULL), (long)(t % 1000000000ULL) };
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static uint64_t max64(uint64_t a, uint64_t b) { return a > b ? a : b; }

/* ------------------------------------------------------------------ counters */
struct counter_lib {
    const char *lib;
    const char *const *names;
    unsigned long long *counts;
    int n;
};
static struct counter_lib g_libs[8];
static int g_nlibs;

ARGUS_EXPORT void argus_sim_register_counters(const char *lib, const char *const *names,
                                              unsigned long long *counts, int n)
{
    ARGUS_FRAME();
    if (g_nlibs < 8)
        g_libs[g_nlibs++] = (struct counter_lib){ lib, names, counts, n };
}

ARGUS_EXPORT void argus_sim_write_counts_json(int fd)
{
    ARGUS_FRAME();
    dprintf(fd, "{");
    for (int l = 0; l < g_nlibs; l++) {
        dprintf(fd, "%s\"%s\": {", l ? ", " : "", g_libs[l].lib);
        for (int i = 0; i < g_libs[l].n; i++)
            dprintf(fd, "%s\"%s\": %llu", i ? ", " : "", g_libs[l].names[i],
                    __atomic_load_n(&g_libs[l].counts[i], __ATOMIC_RELAXED));
        dprintf(fd, "}");
    }
    dprintf(fd, "}");
}

/* ------------------------------------------------------------------ state */
static pthread_mutex_t G = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_progress = PTHREAD_COND_INITIALIZER;

static double g_gpu_speed = 1.0;     /* >1 faster, <1 slower */
static double g_link_speed = 1.0;
static unsigned g_clock_mhz = ARGUS_SIM_MAX_SM_MHZ;
static unsigned long long g_throttle;
static int g_dev = -1;
static struct argus_dev_state *g_devstate;
static char g_devpath[256];
static uint64_t g_mem_used;
static double g_bus_bytes_per_ns = 50.0; /* 50 GB/s */
static double g_copy_bytes_per_ns = 20.0;
static argus_sim_activity_fn g_hook;
static uint32_t g_next_corr, g_next_stream_id;
static struct argus_sim_gpu_totals g_totals;

enum { OP_DELAY, OP_EVENT, OP_WAIT, OP_NCCL };

struct nccl_part {
    argus_sim_comm *c;
    int kind;
    int peer;
    uint64_t bytes;
    uint64_t seq;
    argus_sim_nccl_done_fn done;
    void *user;
};

struct op {
    struct op *next;
    int kind;
    int is_kernel;
    uint64_t enq_ns;
    uint64_t dur_ns;
    argus_sim_event *ev;
    uint64_t gen;
    struct nccl_part *parts;
    int nparts;
    int act;            /* ARGUS_SIM_ACT_* reported to the activity hook, 0: none */
    uint64_t bytes;
    const void *func;
    uint32_t corr;
};

struct argus_sim_stream {
    int nonblocking;
    int legacy;
    struct op *head, *tail;
    uint64_t enq, sched;
    uint64_t last_end;
    pthread_cond_t cond;
    pthread_t thr;
    int has_thread;
    argus_sim_event *implicit;
    argus_sim_stream *next_all;
    uint32_t id;
};

struct argus_sim_event {
    uint64_t rec_gen, done_gen, ts;
};

static argus_sim_stream *g_streams;  /* all streams of the process */
static argus_sim_stream *g_legacy;
static __thread argus_sim_stream *t_ptds;

/* ------------------------------------------------------------------ device file */
static const char *sim_node(void)
{
    const char *n = getenv("ARGUS_SIM_NODE");
    return (n && *n) ? n : "node0";
}

static void dev_publish_locked(void)
{
    struct argus_dev_state *d = g_devstate;
    if (!d)
        return;
    d->sm_clock_mhz = g_clock_mhz;
    d->throttle_reasons = g_throttle;
    d->mem_used_bytes = g_mem_used;
    d->updated_ns = now_ns();
}

static void dev_close_locked(void)
{
    if (!g_devstate)
        return;
    if (g_devstate->tgid == getpid()) {
        g_devstate->tgid = 0;
        unlink(g_devpath);
    }
    munmap(g_devstate, sizeof(*g_devstate));
    g_devstate = NULL;
}

static void dev_open_locked(int dev)
{
    dev_close_locked();
    g_dev = dev;
    snprintf(g_devpath, sizeof g_devpath, "/dev/shm/argus-sim-%s-gpu%d", sim_node(), dev);
    int fd = open(g_devpath, O_RDWR | O_CREAT, 0666);
    if (fd < 0)
        return;
    if (ftruncate(fd, sizeof(struct argus_dev_state)) == 0) {
        void *p = mmap(NULL, sizeof(struct argus_dev_state), PROT_READ | PROT_WRITE,
                       MAP_SHARED, fd, 0);
        if (p != MAP_FAILED) {
            struct argus_dev_state *d = p;
            memset(d, 0, sizeof *d);
            d->index = (uint32_t)dev;
            d->max_sm_clock_mhz = ARGUS_SIM_MAX_SM_MHZ;
            d->mem_clock_mhz = d->max_mem_clock_mhz = ARGUS_SIM_MEM_MHZ;
            d->mem_total_bytes = ARGUS_SIM_MEM_TOTAL;
            d->tgid = getpid();
            __atomic_store_n(&d->magic, ARGUS_DEV_MAGIC, __ATOMIC_RELEASE);
            g_devstate = d;
            dev_publish_locked();
        }
    }
    close(fd);
}

static void ensure_device_locked(void)
{
    if (g_dev < 0)
        dev_open_locked(0);
}

static void add_busy_locked(uint64_t start, uint64_t end)
{
    struct argus_dev_state *d = g_devstate;
    if (!d || end <= start)
        return;
    for (uint64_t b = start / ARGUS_DEV_BUCKET_NS; b <= (end - 1) / ARGUS_DEV_BUCKET_NS; b++) {
        uint64_t lo = max64(start, b * ARGUS_DEV_BUCKET_NS);
        uint64_t hi = end < (b + 1) * ARGUS_DEV_BUCKET_NS ? end : (b + 1) * ARGUS_DEV_BUCKET_NS;
        int slot = (int)(b % ARGUS_DEV_BUCKETS);
        if (d->bucket_idx[slot] != b) {
            d->busy_ns[slot] = 0;
            d->bucket_idx[slot] = b;
        }
        d->busy_ns[slot] += hi - lo;
    }
}

__attribute__((destructor)) static void simgpu_fini(void)
{
    pthread_mutex_lock(&G);
    dev_close_locked();
    pthread_mutex_unlock(&G);
}

__attribute__((constructor)) static void simgpu_init(void)
{
    const char *bw = getenv("ARGUS_SIM_BUS_GBPS");
    if (bw && atof(bw) > 0)
        g_bus_bytes_per_ns = atof(bw);
    const char *gs = getenv("ARGUS_SIM_GPU_SPEED");
    if (gs && atof(gs) > 0)
        g_gpu_speed = atof(gs);
}

ARGUS_EXPORT int argus_sim_device_count(void)
{
    ARGUS_FRAME();
    const char *n = getenv("ARGUS_SIM_GPUS");
    int v = n ? atoi(n) : 8;
    return v > 0 ? v : 8;
}

ARGUS_EXPORT int argus_sim_set_device(int dev)
{
    ARGUS_FRAME();
    if (dev < 0 || dev >= argus_sim_device_count())
        return -1;
    pthread_mutex_lock(&G);
    if (dev != g_dev)
        dev_open_locked(dev);
    pthread_mutex_unlock(&G);
    return 0;
}

ARGUS_EXPORT int argus_sim_get_device(void)
{
    ARGUS_FRAME();
    return g_dev < 0 ? 0 : g_dev;
}

/* ------------------------------------------------------------------ memory */
struct alloc { struct alloc *next; uintptr_t p; size_t n; };
static struct alloc *g_allocs;
static uintptr_t g_next_addr = 0x7e0000000000ULL;

ARGUS_EXPORT void *argus_sim_mem_alloc(size_t bytes)
{
    ARGUS_FRAME();
    struct alloc *a = malloc(sizeof *a);
    if (!a)
        return NULL;
    pthread_mutex_lock(&G);
    ensure_device_locked();
    if (g_mem_used + bytes > ARGUS_SIM_MEM_TOTAL) {
        pthread_mutex_unlock(&G);
        free(a);
        return NULL;
    }
    a->p = g_next_addr;
    a->n = bytes;
    g_next_addr += (bytes + 511) & ~(uintptr_t)511;
    a->next = g_allocs;
    g_allocs = a;
    g_mem_used += bytes;
    dev_publish_locked();
    pthread_mutex_unlock(&G);
    return (void *)a->p;
}

ARGUS_EXPORT int argus_sim_mem_free(void *p)
{
    ARGUS_FRAME();
    int rc = -1;
    pthread_mutex_lock(&G);
    for (struct alloc **pp = &g_allocs; *pp; pp = &(*pp)->next) {
        if ((*pp)->p == (uintptr_t)p) {
            struct alloc *a = *pp;
            *pp = a->next;
            g_mem_used -= a->n;
            free(a);
            rc = 0;
            break;
        }
    }
    dev_publish_locked();
    pthread_mutex_unlock(&G);
    return p ? rc : 0;
}

/* ------------------------------------------------------------------ streams */
static void nccl_execute(struct op *op, uint64_t start, uint64_t *end);

/* Schedules op on s (G held); returns 0 if it must wait (WAIT on an unscheduled event). */
static int try_schedule_locked(argus_sim_stream *s, struct op *op)
{
    switch (op->kind) {
    case OP_DELAY: {
        uint64_t start = max64(s->last_end, op->enq_ns);
        s->last_end = start + op->dur_ns;
        if (op->is_kernel)
            add_busy_locked(start, s->last_end);
        if (op->act == ARGUS_SIM_ACT_KERNEL) {
            g_totals.kernels++;
            g_totals.kernel_ns += op->dur_ns;
        } else if (op->act == ARGUS_SIM_ACT_MEMCPY) {
            g_totals.copies++;
            g_totals.copy_ns += op->dur_ns;
        } else if (op->act == ARGUS_SIM_ACT_MEMSET) {
            g_totals.memsets++;
        }
        if (g_hook && op->act) {
            struct argus_sim_activity a = { op->act, s->id, op->corr, (uint32_t)(g_dev < 0 ? 0 : g_dev),
                                            start, s->last_end, op->bytes, 0, op->func, NULL };
            if (op->act == ARGUS_SIM_ACT_KERNEL)
                a.threads = op->bytes, a.bytes = 0;
            g_hook(&a);
        }
        break;
    }
    case OP_EVENT:
        op->ev->ts = max64(s->last_end, op->enq_ns);
        if (op->ev->done_gen < op->gen)
            op->ev->done_gen = op->gen;
        break;
    case OP_WAIT:
        if (op->ev->done_gen < op->gen)
            return 0;
        s->last_end = max64(s->last_end, op->ev->ts);
        break;
    default:
        return 0;
    }
    s->sched++;
    pthread_cond_broadcast(&g_progress);
    return 1;
}

static void *stream_worker(void *arg)
{
    argus_sim_stream *s = arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    pthread_mutex_lock(&G);
    for (;;) {
        while (!s->head)
            pthread_cond_wait(&s->cond, &G);
        struct op *op = s->head;
        if (op->kind == OP_NCCL) {
            uint64_t start = max64(s->last_end, op->enq_ns), end = start;
            pthread_mutex_unlock(&G);
            nccl_execute(op, start, &end);
            if (g_hook) {
                static const char *const knames[] = {
                    "ncclDevKernel_AllReduce", "ncclDevKernel_AllGather",
                    "ncclDevKernel_ReduceScatter", "ncclDevKernel_Broadcast",
                    "ncclDevKernel_Reduce", "ncclDevKernel_SendRecv", "ncclDevKernel_SendRecv" };
                uint64_t bytes = 0;
                for (int i = 0; i < op->nparts; i++)
                    bytes += op->parts[i].bytes;
                int k = op->nparts ? op->parts[0].kind : 0;
                struct argus_sim_activity a = { ARGUS_SIM_ACT_NCCL, s->id, op->corr,
                                                (uint32_t)(g_dev < 0 ? 0 : g_dev), start, end,
                                                bytes, 0, NULL,
                                                (k >= 0 && k < 7) ? knames[k] : "ncclDevKernel" };
                g_hook(&a);
            }
            pthread_mutex_lock(&G);
            g_totals.nccl_ops++;
            s->last_end = end;
            s->sched++;
            pthread_cond_broadcast(&g_progress);
        } else {
            while (!try_schedule_locked(s, op))
                pthread_cond_wait(&g_progress, &G);
        }
        s->head = op->next;
        if (!s->head)
            s->tail = NULL;
        free(op->parts);
        free(op);
    }
    return NULL;
}

static argus_sim_stream *stream_new_locked(int nonblocking, int legacy)
{
    argus_sim_stream *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->nonblocking = nonblocking;
    s->legacy = legacy;
    pthread_cond_init(&s->cond, NULL);
    s->implicit = calloc(1, sizeof(argus_sim_event));
    s->id = ++g_next_stream_id;
    s->next_all = g_streams;
    g_streams = s;
    ensure_device_locked();
    return s;
}

ARGUS_EXPORT argus_sim_stream *argus_sim_stream_create(int nonblocking)
{
    ARGUS_FRAME();
    pthread_mutex_lock(&G);
    argus_sim_stream *s = stream_new_locked(nonblocking, 0);
    pthread_mutex_unlock(&G);
    return s;
}

ARGUS_EXPORT argus_sim_stream *argus_sim_stream_resolve(void *handle, int per_thread_default)
{
    ARGUS_FRAME();
    uintptr_t h = (uintptr_t)handle;
    if (h > 2)
        return handle;
    if (h == 2 || (h == 0 && per_thread_default)) {
        if (!t_ptds) {
            pthread_mutex_lock(&G);
            t_ptds = stream_new_locked(0, 0);
            pthread_mutex_unlock(&G);
        }
        return t_ptds;
    }
    /* 0 = legacy default stream, 1 = cudaStreamLegacy */
    pthread_mutex_lock(&G);
    if (!g_legacy)
        g_legacy = stream_new_locked(0, 1);
    pthread_mutex_unlock(&G);
    return g_legacy;
}

ARGUS_EXPORT int argus_sim_stream_destroy(argus_sim_stream *s)
{
    ARGUS_FRAME();
    /* Streams live until exit: their worker threads may still hold ops (CUDA lets a
     * stream be destroyed with work pending and completes the work). */
    (void)s;
    return 0;
}

static int stream_busy_locked(argus_sim_stream *s, uint64_t now)
{
    return s->enq > s->sched || s->last_end > now;
}

static void push_locked(argus_sim_stream *s, struct op *op)
{
    s->enq++;
    if (!s->head && op->kind != OP_NCCL && try_schedule_locked(s, op)) {
        free(op);
        return;
    }
    op->next = NULL;
    if (s->tail)
        s->tail->next = op;
    else
        s->head = op;
    s->tail = op;
    if (!s->has_thread) {
        pthread_create(&s->thr, NULL, stream_worker, s);
        pthread_detach(s->thr);
        s->has_thread = 1;
    }
    pthread_cond_signal(&s->cond);
}

static struct op *op_new(int kind, uint64_t enq)
{
    struct op *op = calloc(1, sizeof *op);
    op->kind = kind;
    op->enq_ns = enq;
    return op;
}

static void record_locked(argus_sim_event *e, argus_sim_stream *s, uint64_t t)
{
    struct op *op = op_new(OP_EVENT, t);
    op->ev = e;
    op->gen = ++e->rec_gen;
    push_locked(s, op);
}

static void wait_event_locked(argus_sim_stream *s, argus_sim_event *e, uint64_t t)
{
    struct op *op = op_new(OP_WAIT, t);
    op->ev = e;
    op->gen = e->rec_gen;
    push_locked(s, op);
}

/* Legacy default stream semantics: implicit dependencies before op lands on s. */
static void implicit_sync_locked(argus_sim_stream *s, uint64_t t)
{
    if (s->nonblocking)
        return;
    if (s->legacy) {
        for (argus_sim_stream *o = g_streams; o; o = o->next_all) {
            if (o == s || o->nonblocking || !stream_busy_locked(o, t))
                continue;
            record_locked(o->implicit, o, t);
            wait_event_locked(s, o->implicit, t);
        }
    } else if (g_legacy && g_legacy != s && stream_busy_locked(g_legacy, t)) {
        record_locked(g_legacy->implicit, g_legacy, t);
        wait_event_locked(s, g_legacy->implicit, t);
    }
}

/* act/bytes/func: what the activity hook reports (bytes: threads for a kernel) */
static void enqueue_delay(argus_sim_stream *s, uint64_t ns, int is_kernel, int act,
                          uint64_t bytes, const void *func)
{
    uint64_t t = now_ns();
    pthread_mutex_lock(&G);
    implicit_sync_locked(s, t);
    struct op *op = op_new(OP_DELAY, t);
    op->dur_ns = ns;
    op->is_kernel = is_kernel;
    op->act = act;
    op->bytes = bytes;
    op->func = func;
    op->corr = ++g_next_corr;
    push_locked(s, op);
    pthread_mutex_unlock(&G);
}

static uint64_t kernel_ns(uint64_t threads)
{
    return (uint64_t)((double)threads / g_gpu_speed *
                      ((double)ARGUS_SIM_MAX_SM_MHZ / g_clock_mhz));
}

ARGUS_EXPORT void argus_sim_enqueue_kernel(argus_sim_stream *s, uint64_t threads)
{
    ARGUS_FRAME();
    enqueue_delay(s, kernel_ns(threads), 1, ARGUS_SIM_ACT_KERNEL, threads, NULL);
}

ARGUS_EXPORT void argus_sim_enqueue_kernel_ex(argus_sim_stream *s, uint64_t threads,
                                              const void *func)
{
    ARGUS_FRAME();
    enqueue_delay(s, kernel_ns(threads), 1, ARGUS_SIM_ACT_KERNEL, threads, func);
}

ARGUS_EXPORT void argus_sim_enqueue_copy(argus_sim_stream *s, uint64_t bytes)
{
    ARGUS_FRAME();
    enqueue_delay(s, 2000 + (uint64_t)((double)bytes / g_copy_bytes_per_ns), 0,
                  ARGUS_SIM_ACT_MEMCPY, bytes, NULL);
}

/* a memset runs at the copy engine's speed: 1 us + bytes / bandwidth */
ARGUS_EXPORT void argus_sim_enqueue_memset(argus_sim_stream *s, uint64_t bytes)
{
    ARGUS_FRAME();
    enqueue_delay(s, 1000 + (uint64_t)((double)bytes / g_copy_bytes_per_ns), 0,
                  ARGUS_SIM_ACT_MEMSET, bytes, NULL);
}

ARGUS_EXPORT void argus_sim_set_activity_hook(argus_sim_activity_fn fn)
{
    ARGUS_FRAME();
    pthread_mutex_lock(&G);
    g_hook = fn;
    pthread_mutex_unlock(&G);
}

ARGUS_EXPORT void argus_sim_gpu_totals(struct argus_sim_gpu_totals *out)
{
    ARGUS_FRAME();
    pthread_mutex_lock(&G);
    *out = g_totals;
    pthread_mutex_unlock(&G);
}

ARGUS_EXPORT void argus_sim_enqueue_delay(argus_sim_stream *s, uint64_t ns)
{
    ARGUS_FRAME();
    enqueue_delay(s, ns, 1, ARGUS_SIM_ACT_KERNEL, 0, NULL);
}

static void stream_sync(argus_sim_stream *s)
{
    pthread_mutex_lock(&G);
    uint64_t target = s->enq;
    while (s->sched < target)
        pthread_cond_wait(&g_progress, &G);
    uint64_t t = s->last_end;
    pthread_mutex_unlock(&G);
    sleep_until(t);
}

ARGUS_EXPORT void argus_sim_stream_sync(argus_sim_stream *s)
{
    ARGUS_FRAME();
    /* the legacy stream also waits for blocking streams */
    if (s->legacy) {
        uint64_t t = now_ns();
        pthread_mutex_lock(&G);
        implicit_sync_locked(s, t);
        pthread_mutex_unlock(&G);
    }
    stream_sync(s);
}

ARGUS_EXPORT int argus_sim_stream_idle(argus_sim_stream *s)
{
    ARGUS_FRAME();
    pthread_mutex_lock(&G);
    int busy = stream_busy_locked(s, now_ns());
    pthread_mutex_unlock(&G);
    return !busy;
}

ARGUS_EXPORT void argus_sim_device_sync(void)
{
    ARGUS_FRAME();
    pthread_mutex_lock(&G);
    uint64_t t = 0;
    for (argus_sim_stream *s = g_streams; s; s = s->next_all) {
        uint64_t target = s->enq;
        while (s->sched < target)
            pthread_cond_wait(&g_progress, &G);
        t = max64(t, s->last_end);
    }
    pthread_mutex_unlock(&G);
    sleep_until(t);
}

/* ------------------------------------------------------------------ events */
ARGUS_EXPORT argus_sim_event *argus_sim_event_create(void)
{
    ARGUS_FRAME();
    return calloc(1, sizeof(argus_sim_event));
}

ARGUS_EXPORT void argus_sim_event_destroy(argus_sim_event *e)
{
    ARGUS_FRAME();
    (void)e; /* may still be referenced by queued ops; kept until exit */
}

ARGUS_EXPORT void argus_sim_event_record(argus_sim_event *e, argus_sim_stream *s)
{
    ARGUS_FRAME();
    uint64_t t = now_ns();
    pthread_mutex_lock(&G);
    implicit_sync_locked(s, t);
    record_locked(e, s, t);
    pthread_mutex_unlock(&G);
}

ARGUS_EXPORT void argus_sim_stream_wait_event(argus_sim_stream *s, argus_sim_event *e)
{
    ARGUS_FRAME();
    uint64_t t = now_ns();
    pthread_mutex_lock(&G);
    wait_event_locked(s, e, t);
    pthread_mutex_unlock(&G);
}

ARGUS_EXPORT void argus_sim_event_sync(argus_sim_event *e)
{
    ARGUS_FRAME();
    pthread_mutex_lock(&G);
    uint64_t gen = e->rec_gen;
    while (e->done_gen < gen)
        pthread_cond_wait(&g_progress, &G);
    uint64_t t = e->ts;
    pthread_mutex_unlock(&G);
    sleep_until(t);
}

ARGUS_EXPORT int argus_sim_event_done(argus_sim_event *e)
{
    ARGUS_FRAME();
    pthread_mutex_lock(&G);
    int done = e->done_gen >= e->rec_gen && e->ts <= now_ns();
    pthread_mutex_unlock(&G);
    return done;
}

/* ------------------------------------------------------------------ control */
ARGUS_EXPORT void argus_sim_set_gpu_speed(double factor)
{
    ARGUS_FRAME();
    pthread_mutex_lock(&G);
    g_gpu_speed = factor > 0 ? factor : 1.0;
    pthread_mutex_unlock(&G);
}

ARGUS_EXPORT void argus_sim_set_link_speed(double factor)
{
    ARGUS_FRAME();
    pthread_mutex_lock(&G);
    g_link_speed = factor > 0 ? factor : 1.0;
    pthread_mutex_unlock(&G);
}

ARGUS_EXPORT void argus_sim_set_clock_mhz(unsigned sm_mhz, unsigned long long reasons)
{
    ARGUS_FRAME();
    pthread_mutex_lock(&G);
    ensure_device_locked();
    g_clock_mhz = (sm_mhz > 0 && sm_mhz <= ARGUS_SIM_MAX_SM_MHZ) ? sm_mhz : ARGUS_SIM_MAX_SM_MHZ;
    g_throttle = reasons;
    dev_publish_locked();
    pthread_mutex_unlock(&G);
}

ARGUS_EXPORT unsigned argus_sim_max_clock_mhz(void)
{
    ARGUS_FRAME();
    return ARGUS_SIM_MAX_SM_MHZ;
}

/* ------------------------------------------------------------------ communicators */
struct coll_slot {
    uint64_t seq1[MAXR];
    uint64_t t[MAXR];
    double slow[MAXR];
};
struct p2p_slot {
    uint64_t send1, tsend;
    double ssend;
    uint64_t recv1, trecv;
    double srecv;
};
struct split_slot {
    uint64_t seq1[MAXR];
    int32_t color[MAXR];
    int32_t key[MAXR];
};
struct comm_shm {
    uint32_t futex;
    uint32_t destroyed;
    uint64_t joined[MAXR];
    struct split_slot split[4];
    struct coll_slot coll[NSLOTS];
    struct p2p_slot p2p[MAXR][MAXR][P2PSLOTS];
};

struct argus_sim_comm {
    struct comm_shm *m;
    int nranks, rank, dev;
    uint64_t coll_seq, split_n;
    uint64_t send_n[MAXR], recv_n[MAXR];
    unsigned char id[128];
    char path[256];
};

static void shm_bump(struct comm_shm *m)
{
    __atomic_add_fetch(&m->futex, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &m->futex, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

typedef int (*ready_fn)(struct comm_shm *m, void *arg);

static void shm_wait(struct comm_shm *m, ready_fn ready, void *arg)
{
    for (;;) {
        uint32_t v = __atomic_load_n(&m->futex, __ATOMIC_SEQ_CST);
        if (ready(m, arg))
            return;
        struct timespec to = { 0, 200000000 };
        syscall(SYS_futex, &m->futex, FUTEX_WAIT, v, &to, NULL, 0);
    }
}

ARGUS_EXPORT void argus_sim_unique_id(unsigned char id[128])
{
    ARGUS_FRAME();
    memset(id, 0, 128);
    if (getrandom(id, 16, 0) != 16) {
        uint64_t t = now_ns() ^ ((uint64_t)getpid() << 32);
        memcpy(id, &t, 8);
    }
    memcpy(id + 16, "argus-sim", 9);
}

static uint64_t fnv(const unsigned char *p, size_t n, uint64_t h)
{
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

struct join_arg { int nranks; };
static int all_joined(struct comm_shm *m, void *arg)
{
    int n = ((struct join_arg *)arg)->nranks;
    for (int r = 0; r < n; r++)
        if (!__atomic_load_n(&m->joined[r], __ATOMIC_ACQUIRE))
            return 0;
    return 1;
}

ARGUS_EXPORT argus_sim_comm *argus_sim_comm_init(const unsigned char id[128], int nranks,
                                                 int rank, int dev)
{
    ARGUS_FRAME();
    if (nranks < 1 || nranks > MAXR || rank < 0 || rank >= nranks)
        return NULL;
    argus_sim_comm *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    memcpy(c->id, id, 128);
    c->nranks = nranks;
    c->rank = rank;
    c->dev = dev;
    const char *job = getenv("ARGUS_SIM_JOB");
    snprintf(c->path, sizeof c->path, "/dev/shm/argus-sim-%s-comm-%016llx%016llx",
             (job && *job) ? job : "nojob",
             (unsigned long long)fnv(id, 128, 14695981039346656037ULL),
             (unsigned long long)fnv(id, 128, 0x9e3779b97f4a7c15ULL));
    int fd = open(c->path, O_RDWR | O_CREAT, 0666);
    if (fd < 0) {
        free(c);
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) == 0 && st.st_size < (off_t)sizeof(struct comm_shm) &&
        ftruncate(fd, sizeof(struct comm_shm)) != 0) {
        close(fd);
        free(c);
        return NULL;
    }
    c->m = mmap(NULL, sizeof(struct comm_shm), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (c->m == MAP_FAILED) {
        free(c);
        return NULL;
    }
    __atomic_store_n(&c->m->joined[rank], 1, __ATOMIC_RELEASE);
    shm_bump(c->m);
    struct join_arg ja = { nranks };
    shm_wait(c->m, all_joined, &ja);
    return c;
}

struct split_arg { int nranks; uint64_t n1; };
static int all_split(struct comm_shm *m, void *arg)
{
    struct split_arg *a = arg;
    struct split_slot *sl = &m->split[(a->n1 - 1) % 4];
    for (int r = 0; r < a->nranks; r++)
        if (__atomic_load_n(&sl->seq1[r], __ATOMIC_ACQUIRE) != a->n1)
            return 0;
    return 1;
}

ARGUS_EXPORT argus_sim_comm *argus_sim_comm_split(argus_sim_comm *p, int color, int key)
{
    ARGUS_FRAME();
    uint64_t n1 = ++p->split_n;
    struct split_slot *sl = &p->m->split[(n1 - 1) % 4];
    sl->color[p->rank] = color;
    sl->key[p->rank] = key;
    __atomic_store_n(&sl->seq1[p->rank], n1, __ATOMIC_RELEASE);
    shm_bump(p->m);
    struct split_arg sa = { p->nranks, n1 };
    shm_wait(p->m, all_split, &sa);
    if (color < 0)
        return NULL;
    int count = 0, myrank = 0;
    for (int r = 0; r < p->nranks; r++) {
        if (sl->color[r] != color)
            continue;
        count++;
        if (sl->key[r] < key || (sl->key[r] == key && r < p->rank))
            myrank++;
    }
    unsigned char id[128];
    memcpy(id, p->id, 128);
    snprintf((char *)id + 64, 64, "split-%llu-color-%d", (unsigned long long)n1, color);
    return argus_sim_comm_init(id, count, myrank, p->dev);
}

ARGUS_EXPORT void argus_sim_comm_destroy(argus_sim_comm *c)
{
    ARGUS_FRAME();
    if (!c)
        return;
    if (__atomic_add_fetch(&c->m->destroyed, 1, __ATOMIC_SEQ_CST) == (uint32_t)c->nranks)
        unlink(c->path);
    munmap(c->m, sizeof(struct comm_shm));
    free(c);
}

ARGUS_EXPORT int argus_sim_comm_nranks(argus_sim_comm *c) { ARGUS_FRAME(); return c->nranks; }
ARGUS_EXPORT int argus_sim_comm_rank(argus_sim_comm *c) { ARGUS_FRAME(); return c->rank; }
ARGUS_EXPORT int argus_sim_comm_device(argus_sim_comm *c) { ARGUS_FRAME(); return c->dev; }

static __thread int t_group_depth;
static __thread struct nccl_part *t_group_parts;
static __thread int t_group_n, t_group_cap;
static __thread argus_sim_stream *t_group_stream;

static void enqueue_parts(argus_sim_stream *s, struct nccl_part *parts, int n)
{
    uint64_t t = now_ns();
    pthread_mutex_lock(&G);
    implicit_sync_locked(s, t);
    struct op *op = op_new(OP_NCCL, t);
    op->parts = parts;
    op->nparts = n;
    op->corr = ++g_next_corr;
    push_locked(s, op);
    pthread_mutex_unlock(&G);
}

ARGUS_EXPORT void argus_sim_enqueue_nccl(argus_sim_comm *c, int kind, uint64_t bytes, int peer,
                                         argus_sim_stream *s)
{
    ARGUS_FRAME();
    argus_sim_enqueue_nccl_ex(c, kind, bytes, peer, s, NULL, NULL);
}

ARGUS_EXPORT uint64_t argus_sim_comm_hash(argus_sim_comm *c)
{
    ARGUS_FRAME();
    return fnv(c->id, 128, 14695981039346656037ULL);
}

ARGUS_EXPORT uint64_t argus_sim_comm_seq(argus_sim_comm *c)
{
    ARGUS_FRAME();
    return c->coll_seq;
}

ARGUS_EXPORT void argus_sim_enqueue_nccl_ex(argus_sim_comm *c, int kind, uint64_t bytes, int peer,
                                            argus_sim_stream *s, argus_sim_nccl_done_fn done,
                                            void *user)
{
    ARGUS_FRAME();
    struct nccl_part p = { c, kind, peer, bytes, 0, done, user };
    if (kind == ARGUS_P2P_SEND)
        p.seq = c->send_n[peer]++;
    else if (kind == ARGUS_P2P_RECV)
        p.seq = c->recv_n[peer]++;
    else
        p.seq = c->coll_seq++;
    if (t_group_depth > 0) {
        if (t_group_n == t_group_cap) {
            t_group_cap = t_group_cap ? 2 * t_group_cap : 8;
            t_group_parts = realloc(t_group_parts, t_group_cap * sizeof *t_group_parts);
        }
        t_group_parts[t_group_n++] = p;
        if (!t_group_stream)
            t_group_stream = s;
        return;
    }
    struct nccl_part *one = malloc(sizeof *one);
    *one = p;
    enqueue_parts(s, one, 1);
}

ARGUS_EXPORT void argus_sim_group_start(void)
{
    ARGUS_FRAME();
    t_group_depth++;
}

ARGUS_EXPORT void argus_sim_group_end(void)
{
    ARGUS_FRAME();
    if (t_group_depth > 0 && --t_group_depth == 0 && t_group_n > 0) {
        enqueue_parts(t_group_stream, t_group_parts, t_group_n);
        t_group_parts = NULL;
        t_group_n = t_group_cap = 0;
        t_group_stream = NULL;
    }
}

static double coll_cost_ns(int kind, uint64_t bytes, int n)
{
    double b = (double)bytes / g_bus_bytes_per_ns;
    if (kind == ARGUS_P2P_SEND || kind == ARGUS_P2P_RECV)
        return 8000.0 + b;
    if (n <= 1)
        return 5000.0;
    double lat = 15000.0 + 2000.0 * (n - 1);
    switch (kind) {
    case ARGUS_COLL_ALLREDUCE:
        return lat + 2.0 * (n - 1) / n * b;
    case ARGUS_COLL_ALLGATHER:
    case ARGUS_COLL_REDUCESCATTER:
        return lat + (double)(n - 1) / n * b;
    default:
        return lat + b;
    }
}

static int coll_ready(struct comm_shm *m, void *arg)
{
    struct nccl_part *p = arg;
    struct coll_slot *sl = &m->coll[p->seq % NSLOTS];
    for (int r = 0; r < p->c->nranks; r++)
        if (__atomic_load_n(&sl->seq1[r], __ATOMIC_ACQUIRE) != p->seq + 1)
            return 0;
    return 1;
}

static struct p2p_slot *p2p_slot_of(struct nccl_part *p)
{
    int src = p->kind == ARGUS_P2P_SEND ? p->c->rank : p->peer;
    int dst = p->kind == ARGUS_P2P_SEND ? p->peer : p->c->rank;
    return &p->c->m->p2p[src][dst][p->seq % P2PSLOTS];
}

static int p2p_ready(struct comm_shm *m, void *arg)
{
    (void)m;
    struct nccl_part *p = arg;
    struct p2p_slot *sl = p2p_slot_of(p);
    return __atomic_load_n(&sl->send1, __ATOMIC_ACQUIRE) == p->seq + 1 &&
           __atomic_load_n(&sl->recv1, __ATOMIC_ACQUIRE) == p->seq + 1;
}

/* Runs in the stream worker without G: publish every part, then wait for every part. */
static void nccl_execute(struct op *op, uint64_t start, uint64_t *end)
{
    double slow = 1.0 / g_link_speed;
    for (int i = 0; i < op->nparts; i++) {
        struct nccl_part *p = &op->parts[i];
        argus_sim_comm *c = p->c;
        if (p->kind == ARGUS_P2P_SEND || p->kind == ARGUS_P2P_RECV) {
            if (p->peer < 0 || p->peer >= c->nranks)
                continue;
            struct p2p_slot *sl = p2p_slot_of(p);
            if (p->kind == ARGUS_P2P_SEND) {
                sl->tsend = start;
                sl->ssend = slow;
                __atomic_store_n(&sl->send1, p->seq + 1, __ATOMIC_RELEASE);
            } else {
                sl->trecv = start;
                sl->srecv = slow;
                __atomic_store_n(&sl->recv1, p->seq + 1, __ATOMIC_RELEASE);
            }
        } else {
            struct coll_slot *sl = &c->m->coll[p->seq % NSLOTS];
            sl->t[c->rank] = start;
            sl->slow[c->rank] = slow;
            __atomic_store_n(&sl->seq1[c->rank], p->seq + 1, __ATOMIC_RELEASE);
        }
        shm_bump(c->m);
    }
    uint64_t e = start;
    for (int i = 0; i < op->nparts; i++) {
        struct nccl_part *p = &op->parts[i];
        argus_sim_comm *c = p->c;
        uint64_t arrive = start;
        double s = slow;
        if (p->kind == ARGUS_P2P_SEND || p->kind == ARGUS_P2P_RECV) {
            if (p->peer < 0 || p->peer >= c->nranks)
                continue;
            shm_wait(c->m, p2p_ready, p);
            struct p2p_slot *sl = p2p_slot_of(p);
            arrive = max64(sl->tsend, sl->trecv);
            s = sl->ssend > sl->srecv ? sl->ssend : sl->srecv;
        } else {
            shm_wait(c->m, coll_ready, p);
            struct coll_slot *sl = &c->m->coll[p->seq % NSLOTS];
            for (int r = 0; r < c->nranks; r++) {
                arrive = max64(arrive, sl->t[r]);
                if (sl->slow[r] > s)
                    s = sl->slow[r];
            }
        }
        uint64_t pend = arrive + (uint64_t)(coll_cost_ns(p->kind, p->bytes, c->nranks) * s);
        if (p->done)
            p->done(p->user, start, pend);
        e = max64(e, pend);
    }
    *end = e;
}
