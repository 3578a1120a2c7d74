/*
 * argus_gpu_agent.c - libargus_gpu_agent.so: argus's dormant GPU agent, loaded by the job
 * at start (`argus gpu-env` prints the two variables) and switched on when argus attaches.
 *
 * Entry points (the only exported symbols):
 *  - ncclProfiler_v5, ncclProfiler_v4: NCCL's profiler plugin structs (NCCL_PROFILER_PLUGIN;
 *    NCCL picks the newest version it knows). Declarations: nccl_profiler.h.
 *  - InitializeInjection: the CUDA injection entry (CUDA_INJECTION64_PATH), which resolves
 *    CUPTI's activity API with dlopen/dlsym (libcupti.so.12, or ARGUS_GPU_CUPTI) and
 *    registers the buffer callbacks. Declarations: cupti_subset.h.
 *
 * Shared state: /dev/shm/argus-gpu-<tgid> (layout and ring protocol: argus_gpu_ring.h),
 * created by whichever entry point runs first, ARGUS_GPU_RING_RECORDS records (a power of
 * two, default 16384), mode 0600. Removed at normal exit (destructor). After a crash or
 * SIGKILL the file stays: readers treat a file whose tgid is not alive as stale
 * (argus.collect.gpu_agent.remove_stale removes them); a new process with a recycled pid
 * replaces it.
 *
 * Dormant until enabled: the NCCL event mask stays 0 (NCCL makes no plugin call at all) and
 * no CUPTI activity kind is enabled (CUPTI records nothing). The only cost is one thread
 * sleeping on the header's `enabled` futex word (woken by the reader, or every 100 ms).
 * When it sees enabled = 1 it stores the mask Coll|P2p|KernelCh into NCCL's mask (NCCL
 * reads it at the next group event) and enables CUPTI's CONCURRENT_KERNEL, MEMCPY and
 * MEMSET kinds; then it flushes CUPTI's buffers every 100 ms so records reach the ring.
 * enabled = 0 switches both off again.
 *
 * Records: one per CUPTI kernel/memcpy/memset record, one per NCCL KernelCh event (device
 * start/stop of a collective's or p2p's kernel on one channel, with the communicator hash,
 * sequence number, function and bytes of its parent event). A full ring drops the record
 * and counts it (header.dropped); CUPTI's own drops (no buffer: at most
 * ARGUS_GPU_CUPTI_BUFFERS buffers of 256 KiB outstanding) go to header.cupti_dropped.
 * Cost per record: a CAS and a 104-byte copy.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
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
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "argus_gpu_ring.h"
#include "cupti_subset.h"
#include "nccl_profiler.h"

#define EXPORT __attribute__((visibility("default")))
#define NCCL_MASK (ncclProfileColl | ncclProfileP2p | ncclProfileKernelCh)
#define CUPTI_BUF_BYTES (256u << 10)
#define ARGUS_GPU_CUPTI_BUFFERS 16
#define POLL_NS 100000000L

/* ------------------------------------------------------------------ shared file */
static struct argus_gpu_hdr *H;
static struct argus_gpu_rec *R;
static size_t g_map_bytes;
static uint32_t g_cap_mask;
static pid_t g_owner;
static char g_path[64];
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER; /* contexts, CUPTI switching */

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint32_t ring_capacity(void)
{
    const char *v = getenv("ARGUS_GPU_RING_RECORDS");
    unsigned long want = (v && *v) ? strtoul(v, NULL, 10) : ARGUS_GPU_DEFAULT_RECORDS;
    uint32_t cap = 16;
    while (cap < want && cap < ARGUS_GPU_MAX_RECORDS)
        cap <<= 1;
    return cap;
}

static void shm_create(void)
{
    g_owner = getpid();
    snprintf(g_path, sizeof g_path, "/dev/shm/argus-gpu-%d", (int)g_owner);
    uint32_t cap = ring_capacity();
    size_t bytes = ARGUS_GPU_HDR_BYTES + (size_t)cap * sizeof(struct argus_gpu_rec);
    unlink(g_path); /* a stale file of a dead process that had this pid */
    int fd = open(g_path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return;
    if (ftruncate(fd, (off_t)bytes) != 0) {
        close(fd);
        unlink(g_path);
        return;
    }
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        unlink(g_path);
        return;
    }
    struct argus_gpu_hdr *h = p;
    h->version = ARGUS_GPU_VERSION;
    h->hdr_bytes = ARGUS_GPU_HDR_BYTES;
    h->rec_bytes = sizeof(struct argus_gpu_rec);
    h->capacity = cap;
    h->tgid = (int32_t)g_owner;
    h->created_ns = mono_ns();
    struct argus_gpu_rec *r = (struct argus_gpu_rec *)((char *)p + ARGUS_GPU_HDR_BYTES);
    for (uint32_t i = 0; i < cap; i++)
        r[i].seq = i;
    g_map_bytes = bytes;
    g_cap_mask = cap - 1;
    R = r;
    __atomic_store_n(&h->magic, ARGUS_GPU_MAGIC, __ATOMIC_RELEASE);
    H = h;
}

/* Publish one record (any thread); drops and counts it when the ring is full. */
static void ring_push(const struct argus_gpu_rec *rec)
{
    struct argus_gpu_hdr *h = H;
    if (!h || g_owner != getpid())
        return;
    uint64_t pos = __atomic_load_n(&h->head, __ATOMIC_RELAXED);
    for (;;) {
        struct argus_gpu_rec *slot = &R[pos & g_cap_mask];
        uint64_t seq = __atomic_load_n(&slot->seq, __ATOMIC_ACQUIRE);
        int64_t d = (int64_t)(seq - pos);
        if (d == 0) {
            if (__atomic_compare_exchange_n(&h->head, &pos, pos + 1, 1, __ATOMIC_RELAXED,
                                            __ATOMIC_RELAXED)) {
                memcpy((char *)slot + sizeof slot->seq, (const char *)rec + sizeof rec->seq,
                       sizeof *rec - sizeof rec->seq);
                __atomic_store_n(&slot->seq, pos + 1, __ATOMIC_RELEASE);
                __atomic_fetch_add(&h->written, 1, __ATOMIC_RELAXED);
                return;
            }
        } else if (d < 0) {
            __atomic_fetch_add(&h->dropped, 1, __ATOMIC_RELAXED);
            return;
        } else {
            pos = __atomic_load_n(&h->head, __ATOMIC_RELAXED);
        }
    }
}

static void set_name(struct argus_gpu_rec *r, const char *name)
{
    if (name)
        strncpy(r->name, name, sizeof r->name - 1);
}

/* ------------------------------------------------------------------ CUPTI */
static struct {
    int ok, on;
    cuptiActivityEnable_fn enable;
    cuptiActivityDisable_fn disable;
    cuptiActivityGetNextRecord_fn next;
    cuptiActivityFlushAll_fn flush;
    cuptiActivityGetNumDroppedRecords_fn dropped;
    cuptiGetTimestamp_fn timestamp; /* optional: the clock offset (measure_clock) */
    int outstanding;
} C;

static void CUPTIAPI_request(uint8_t **buffer, size_t *size, size_t *max_records)
{
    *max_records = 0;
    if (__atomic_add_fetch(&C.outstanding, 1, __ATOMIC_RELAXED) > ARGUS_GPU_CUPTI_BUFFERS) {
        __atomic_sub_fetch(&C.outstanding, 1, __ATOMIC_RELAXED);
        *buffer = NULL; /* CUPTI drops the records and counts them */
        *size = 0;
        return;
    }
    void *p = NULL;
    if (posix_memalign(&p, 8, CUPTI_BUF_BYTES) != 0)
        p = NULL;
    *buffer = p;
    *size = p ? CUPTI_BUF_BYTES : 0;
    if (!p)
        __atomic_sub_fetch(&C.outstanding, 1, __ATOMIC_RELAXED);
}

static void cupti_record(const CUpti_Activity *a)
{
    struct argus_gpu_rec r;
    memset(&r, 0, sizeof r);
    r.peer = -1;
    switch (a->kind) {
    case CUPTI_ACTIVITY_KIND_KERNEL:
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        const CUpti_ActivityKernel4 *k = (const void *)a;
        r.kind = ARGUS_GPU_REC_KERNEL;
        r.ts_start_ns = k->start;
        r.ts_end_ns = k->end;
        r.device = (uint16_t)k->deviceId;
        r.stream = k->streamId;
        r.correlation = k->correlationId;
        set_name(&r, k->name);
        break;
    }
    case CUPTI_ACTIVITY_KIND_MEMCPY: {
        const CUpti_ActivityMemcpy *m = (const void *)a;
        r.kind = ARGUS_GPU_REC_MEMCPY;
        r.ts_start_ns = m->start;
        r.ts_end_ns = m->end;
        r.device = (uint16_t)m->deviceId;
        r.stream = m->streamId;
        r.correlation = m->correlationId;
        r.bytes = m->bytes;
        r.op = m->copyKind;
        break;
    }
    case CUPTI_ACTIVITY_KIND_MEMSET: {
        const CUpti_ActivityMemset *m = (const void *)a;
        r.kind = ARGUS_GPU_REC_MEMSET;
        r.ts_start_ns = m->start;
        r.ts_end_ns = m->end;
        r.device = (uint16_t)m->deviceId;
        r.stream = m->streamId;
        r.correlation = m->correlationId;
        r.bytes = m->bytes;
        break;
    }
    default:
        return;
    }
    ring_push(&r);
}

static void CUPTIAPI_complete(CUpti_Context ctx, uint32_t stream, uint8_t *buffer, size_t size,
                              size_t valid)
{
    (void)size;
    if (buffer && valid && C.next) {
        CUpti_Activity *a = NULL;
        while (C.next(buffer, valid, &a) == CUPTI_SUCCESS)
            cupti_record(a);
    }
    size_t lost = 0;
    if (C.dropped && C.dropped(ctx, stream, &lost) == CUPTI_SUCCESS && lost && H)
        __atomic_fetch_add(&H->cupti_dropped, (uint64_t)lost, __ATOMIC_RELAXED);
    if (buffer) {
        free(buffer);
        __atomic_sub_fetch(&C.outstanding, 1, __ATOMIC_RELAXED);
    }
}

static const CUpti_ActivityKind k_kinds[] = { CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL,
                                              CUPTI_ACTIVITY_KIND_MEMCPY,
                                              CUPTI_ACTIVITY_KIND_MEMSET };

/* g_lock held */
static void cupti_switch_locked(int on)
{
    if (!C.ok || C.on == on)
        return;
    for (size_t i = 0; i < sizeof k_kinds / sizeof k_kinds[0]; i++)
        (on ? C.enable : C.disable)(k_kinds[i]);
    C.on = on;
    if (!on)
        C.flush(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
}

/* ------------------------------------------------------------------ NCCL plugin */
enum { EV_CTX = 0x7f000001, EV_OP = 0x7f000002, EV_KCH = 0x7f000003 };

struct ctx {
    uint64_t tag;
    struct ctx *next;
    int *mask;
    uint64_t comm_hash;
    int rank, nranks, version;
};
static struct ctx *g_ctxs;

struct op_ev {
    uint64_t tag;
    struct ctx *ctx;
    int refs;
    uint16_t kind; /* ARGUS_GPU_REC_COLL / _P2P */
    uint8_t op;
    int peer;
    uint64_t seq, bytes;
    char func[16];
};

struct kch_ev {
    uint64_t tag;
    struct op_ev *parent;
    uint64_t start, stop;
    uint8_t channel;
};

static uint8_t op_of(const char *f)
{
    static const char *const names[] = { "AllReduce", "AllGather", "ReduceScatter", "Broadcast",
                                         "Reduce", "Send", "Recv", "AllToAll" };
    if (!f)
        return ARGUS_GPU_OP_UNKNOWN;
    for (unsigned i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(f, names[i]) == 0)
            return (uint8_t)(i + 1);
    return ARGUS_GPU_OP_UNKNOWN;
}

static size_t dtype_bytes(const char *d)
{
    if (!d || strncmp(d, "nccl", 4) != 0)
        return 0;
    d += 4;
    if (!strcmp(d, "Int8") || !strcmp(d, "Uint8") || !strncmp(d, "Float8", 6))
        return 1;
    if (!strcmp(d, "Float16") || !strcmp(d, "Bfloat16"))
        return 2;
    if (!strcmp(d, "Int32") || !strcmp(d, "Uint32") || !strcmp(d, "Float32"))
        return 4;
    if (!strcmp(d, "Int64") || !strcmp(d, "Uint64") || !strcmp(d, "Float64"))
        return 8;
    return 0;
}

static void agent_init(void);

static ncclResult_t ctx_new(void **context, int *mask, uint64_t hash, int nranks, int rank,
                            int version)
{
    agent_init();
    struct ctx *c = calloc(1, sizeof *c);
    if (!c) {
        *mask = 0;
        *context = NULL;
        return 0;
    }
    *c = (struct ctx){ EV_CTX, NULL, mask, hash, rank, nranks, version };
    pthread_mutex_lock(&g_lock);
    c->next = g_ctxs;
    g_ctxs = c;
    int en = H && __atomic_load_n(&H->enabled, __ATOMIC_ACQUIRE);
    __atomic_store_n(mask, en ? NCCL_MASK : 0, __ATOMIC_RELAXED);
    if (H) {
        __atomic_fetch_or(&H->loaded, ARGUS_GPU_LOADED_NCCL, __ATOMIC_RELEASE);
        H->nccl_version = (uint32_t)version;
        __atomic_fetch_add(&H->nccl_comms, 1, __ATOMIC_RELAXED);
        if (en)
            __atomic_fetch_or(&H->active, ARGUS_GPU_ACTIVE_NCCL, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&g_lock);
    *context = c;
    return 0;
}

static ncclResult_t init_v5(void **context, uint64_t commId, int *mask, const char *name,
                            int nNodes, int nranks, int rank, ncclDebugLogger_t logfn)
{
    (void)name; (void)nNodes; (void)logfn;
    return ctx_new(context, mask, commId, nranks, rank, 5);
}

static ncclResult_t init_v4(void **context, int *mask, const char *name, uint64_t commHash,
                            int nNodes, int nranks, int rank, ncclDebugLogger_t logfn)
{
    (void)name; (void)nNodes; (void)logfn;
    return ctx_new(context, mask, commHash, nranks, rank, 4);
}

static ncclResult_t finalize(void *context)
{
    struct ctx *c = context;
    if (!c)
        return 0;
    pthread_mutex_lock(&g_lock);
    for (struct ctx **pp = &g_ctxs; *pp; pp = &(*pp)->next)
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    if (H)
        __atomic_fetch_sub(&H->nccl_comms, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&g_lock);
    /* NCCL stores the mask pointer's target; leave it as it is */
    free(c);
    return 0;
}

static void op_release(struct op_ev *o)
{
    if (o && __atomic_sub_fetch(&o->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(o);
}

/* An op's handle must outlive its stopEvent (NCCL stops a collective once it is enqueued;
 * its KernelCh events, one per channel, come later from the proxy thread with the handle as
 * parent): it holds one reference for stopEvent plus one per channel when KernelCh events
 * are on, and each KernelCh stop drops one. */
static struct op_ev *op_new(struct ctx *c, int p2p, const char *func, uint64_t seq,
                            size_t count, const char *dtype, int peer, int nchannels)
{
    struct op_ev *o = calloc(1, sizeof *o);
    if (!o)
        return NULL;
    o->tag = EV_OP;
    o->ctx = c;
    int kch = c && c->mask && (__atomic_load_n(c->mask, __ATOMIC_RELAXED) & ncclProfileKernelCh);
    o->refs = 1 + (kch ? (nchannels > 0 ? nchannels : 1) : 0);
    o->kind = p2p ? ARGUS_GPU_REC_P2P : ARGUS_GPU_REC_COLL;
    o->op = op_of(func);
    o->peer = p2p ? peer : -1;
    o->seq = seq;
    o->bytes = (uint64_t)count * dtype_bytes(dtype);
    if (func)
        strncpy(o->func, func, sizeof o->func - 1);
    return o;
}

static struct kch_ev *kch_new(void *parent, uint8_t channel, uint64_t ptimer)
{
    struct kch_ev *k = calloc(1, sizeof *k);
    if (!k)
        return NULL;
    struct op_ev *o = parent; /* holds a reference for this channel (op_new) */
    if (o && o->tag != EV_OP)
        o = NULL;
    *k = (struct kch_ev){ EV_KCH, o, ptimer, 0, channel };
    return k;
}

static ncclResult_t start_v5(void *context, void **handle, ncclProfilerEventDescr_v5_t *d)
{
    *handle = NULL;
    struct ctx *c = context;
    if (d->type == ncclProfileColl)
        *handle = op_new(c, 0, d->coll.func, d->coll.seqNumber, d->coll.count, d->coll.datatype,
                         -1, d->coll.nChannels);
    else if (d->type == ncclProfileP2p)
        *handle = op_new(c, 1, d->p2p.func, 0, d->p2p.count, d->p2p.datatype, d->p2p.peer,
                         d->p2p.nChannels);
    else if (d->type == ncclProfileKernelCh)
        *handle = kch_new(d->parentObj, d->kernelCh.channelId, d->kernelCh.pTimer);
    return 0; /* Group and everything else: no handle, nothing recorded */
}

static ncclResult_t start_v4(void *context, void **handle, ncclProfilerEventDescr_v4_t *d)
{
    *handle = NULL;
    struct ctx *c = context;
    if (d->type == ncclProfileColl)
        *handle = op_new(c, 0, d->coll.func, d->coll.seqNumber, d->coll.count, d->coll.datatype,
                         -1, d->coll.nChannels);
    else if (d->type == ncclProfileP2p)
        *handle = op_new(c, 1, d->p2p.func, 0, d->p2p.count, d->p2p.datatype, d->p2p.peer,
                         d->p2p.nChannels);
    else if (d->type == ncclProfileKernelCh)
        *handle = kch_new(d->parentObj, d->kernelCh.channelId, d->kernelCh.pTimer);
    return 0;
}

static ncclResult_t stop_event(void *handle)
{
    if (!handle)
        return 0;
    uint64_t tag = *(uint64_t *)handle;
    if (tag == EV_OP) {
        op_release(handle);
    } else if (tag == EV_KCH) {
        struct kch_ev *k = handle;
        struct op_ev *o = k->parent;
        struct argus_gpu_rec r;
        memset(&r, 0, sizeof r);
        r.kind = o ? o->kind : ARGUS_GPU_REC_COLL;
        r.channel = k->channel;
        r.ts_start_ns = k->start;
        r.ts_end_ns = k->stop;
        r.peer = -1;
        if (o) {
            r.op = o->op;
            r.comm_hash = o->ctx ? o->ctx->comm_hash : 0;
            r.coll_seq = o->seq;
            r.bytes = o->bytes;
            r.peer = o->peer;
            set_name(&r, o->func);
        }
        ring_push(&r);
        op_release(o);
        free(k);
    }
    return 0;
}

static ncclResult_t record_state(void *handle, ncclProfilerEventState_t state,
                                 ncclProfilerEventStateArgs_v5_t *args)
{
    if (handle && args && *(uint64_t *)handle == EV_KCH && state == ncclProfilerKernelChStop)
        ((struct kch_ev *)handle)->stop = args->kernelCh.pTimer;
    return 0;
}

EXPORT ncclProfiler_v5_t ncclProfiler_v5 = { "argus", init_v5, start_v5, stop_event,
                                             record_state, finalize };
EXPORT ncclProfiler_v4_t ncclProfiler_v4 = { "argus", init_v4, start_v4, stop_event,
                                             record_state, finalize };

/* ------------------------------------------------------------------ switching */
static uint64_t realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* g_lock held. CLOCK_MONOTONIC - device time, from the tightest of 7 brackets
 * mono, device, mono: CUPTI's timestamp (the timebase of its activity records, and taken to
 * be NCCL's GPU timer's too), else CLOCK_REALTIME (NCCL alone: its GPU global timer taken to
 * run on the host's wall clock). Stored before `active` is acknowledged. */
static void measure_clock_locked(void)
{
    int cupti = C.ok && C.timestamp;
    uint64_t best = UINT64_MAX;
    int64_t off = 0;
    for (int i = 0; i < 7; i++) {
        uint64_t d = 0;
        uint64_t t0 = mono_ns();
        if (cupti) {
            if (C.timestamp(&d) != CUPTI_SUCCESS) {
                cupti = 0;
                i = -1;
                best = UINT64_MAX;
                continue;
            }
        } else {
            d = realtime_ns();
        }
        uint64_t t1 = mono_ns();
        if (t1 - t0 < best) {
            best = t1 - t0;
            off = (int64_t)(t0 + (t1 - t0) / 2 - d);
        }
    }
    H->clock_offset_ns = off;
    H->clock_error_ns = (uint32_t)(best / 2 > UINT32_MAX ? UINT32_MAX : best / 2);
    __atomic_store_n(&H->clock_source, cupti ? ARGUS_GPU_CLOCK_CUPTI : ARGUS_GPU_CLOCK_REALTIME,
                     __ATOMIC_RELEASE);
}

static void apply(int en)
{
    pthread_mutex_lock(&g_lock);
    uint32_t active = 0;
    if (en) /* before any record of this enable is made */
        measure_clock_locked();
    for (struct ctx *c = g_ctxs; c; c = c->next)
        __atomic_store_n(c->mask, en ? NCCL_MASK : 0, __ATOMIC_RELAXED);
    if (en && g_ctxs)
        active |= ARGUS_GPU_ACTIVE_NCCL;
    cupti_switch_locked(en);
    if (C.on)
        active |= ARGUS_GPU_ACTIVE_CUPTI;
    if (en)
        __atomic_fetch_add(&H->enables, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&H->active, active, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&g_lock);
}

static void *watcher(void *arg)
{
    (void)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    int last = 0;
    for (;;) {
        uint32_t en = __atomic_load_n(&H->enabled, __ATOMIC_ACQUIRE);
        int want = en != 0;
        if (want != last) {
            apply(want);
            last = want;
        } else if (want) {
            /* a context created since (e.g. a new communicator) is already set by ctx_new;
             * refresh the acknowledgement in case CUPTI came later */
            pthread_mutex_lock(&g_lock);
            if (C.ok && !C.on) {
                cupti_switch_locked(1);
                measure_clock_locked(); /* CUPTI came after the enable: its timebase now */
            }
            uint32_t active = (g_ctxs ? ARGUS_GPU_ACTIVE_NCCL : 0) |
                              (C.on ? ARGUS_GPU_ACTIVE_CUPTI : 0);
            __atomic_store_n(&H->active, active, __ATOMIC_RELEASE);
            int flush = C.on;
            pthread_mutex_unlock(&g_lock);
            if (flush)
                C.flush(0);
        }
        struct timespec to = { 0, POLL_NS };
        syscall(SYS_futex, &H->enabled, FUTEX_WAIT, en, &to, NULL, 0);
    }
    return NULL;
}

static void agent_init_once(void)
{
    shm_create();
    if (!H)
        return;
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 64 << 10);
    pthread_create(&t, &at, watcher, NULL);
    pthread_attr_destroy(&at);
}

static void agent_init(void)
{
    pthread_once(&g_once, agent_init_once);
}

__attribute__((destructor)) static void agent_fini(void)
{
    if (!H || g_owner != getpid())
        return;
    pthread_mutex_lock(&g_lock);
    if (C.ok && C.on)
        C.flush(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    pthread_mutex_unlock(&g_lock);
    __atomic_store_n(&H->active, 0, __ATOMIC_RELEASE);
    /* the mapping stays (other threads may still publish); a reader that has it mapped
     * keeps reading after the unlink */
    unlink(g_path);
}

EXPORT int InitializeInjection(void)
{
    agent_init();
    const char *name = getenv("ARGUS_GPU_CUPTI");
    void *lib = NULL;
    if (name && *name)
        lib = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
    if (!lib)
        lib = dlopen("libcupti.so.12", RTLD_NOW | RTLD_GLOBAL);
    if (!lib)
        lib = dlopen("libcupti.so", RTLD_NOW | RTLD_GLOBAL);
    if (!lib || !H)
        return 1; /* no CUPTI: the NCCL half still works */
    cuptiActivityRegisterCallbacks_fn reg = (cuptiActivityRegisterCallbacks_fn)dlsym(
        lib, "cuptiActivityRegisterCallbacks");
    C.enable = (cuptiActivityEnable_fn)dlsym(lib, "cuptiActivityEnable");
    C.disable = (cuptiActivityDisable_fn)dlsym(lib, "cuptiActivityDisable");
    C.next = (cuptiActivityGetNextRecord_fn)dlsym(lib, "cuptiActivityGetNextRecord");
    C.flush = (cuptiActivityFlushAll_fn)dlsym(lib, "cuptiActivityFlushAll");
    C.dropped = (cuptiActivityGetNumDroppedRecords_fn)dlsym(lib,
                                                           "cuptiActivityGetNumDroppedRecords");
    C.timestamp = (cuptiGetTimestamp_fn)dlsym(lib, "cuptiGetTimestamp");
    if (!reg || !C.enable || !C.disable || !C.next || !C.flush)
        return 1;
    if (reg(CUPTIAPI_request, CUPTIAPI_complete) != CUPTI_SUCCESS)
        return 1;
    pthread_mutex_lock(&g_lock);
    C.ok = 1;
    __atomic_fetch_or(&H->loaded, ARGUS_GPU_LOADED_CUPTI, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&g_lock);
    syscall(SYS_futex, &H->enabled, FUTEX_WAKE, INT_MAX, NULL, NULL, 0); /* re-check now */
    return 1;
}
