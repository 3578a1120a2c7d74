/*
 * cupti.c - stand-in libcupti.so.12: the subset of CUPTI's activity API that argus's GPU
 * agent uses (declarations: ../agent/cupti_subset.h), fed by the virtual GPU of
 * libargus_simgpu.so through its activity hook.
 *
 *  - cuptiActivityRegisterCallbacks: the client's buffer-request / buffer-complete callbacks.
 *    The engine hook is installed while at least one kind is enabled, so a registered but
 *    idle subscriber costs the simulated launches nothing (as with CUPTI).
 *  - cuptiActivityEnable / Disable: KERNEL or CONCURRENT_KERNEL (one switch here), MEMCPY,
 *    MEMSET. Every simulated kernel (runtime launches, driver launches, graph launches as one
 *    kernel, NCCL's kernels named ncclDevKernel_<Op>), copy and memset of an enabled kind
 *    becomes one record with the simulated device start/end, as soon as those are known.
 *  - Records go into the buffer the client handed out; a full buffer is completed by this
 *    library's delivery thread (as CUPTI's own worker thread does); cuptiActivityFlushAll
 *    completes the current buffer and every full one in the calling thread and returns once
 *    the delivery thread has handed over what it had taken. No buffer (the
 *    client returned NULL): the record is dropped and counted
 *    (cuptiActivityGetNumDroppedRecords returns the count since its last call).
 *  - cuptiGetTimestamp: CLOCK_MONOTONIC ns, the simulated device clock.
 * Kernel names: a runtime launch is named by its host stub's dynamic symbol when it has one,
 * else "kernel_<offset of the stub in its object>"; driver launches are "unnamed_kernel".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "simgpu.h"
#include "../agent/cupti_subset.h"

#define EXPORT __attribute__((visibility("default")))

static pthread_mutex_t L = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_full_cv = PTHREAD_COND_INITIALIZER;
static pthread_cond_t g_idle_cv = PTHREAD_COND_INITIALIZER;
static int g_inflight; /* lists the delivery thread is handing to the client */
static CUpti_BuffersCallbackRequestFunc g_req;
static CUpti_BuffersCallbackCompleteFunc g_done;
static int g_on_kernel, g_on_memcpy, g_on_memset;
static uint8_t *g_buf;
static size_t g_size, g_used;
static size_t g_dropped;
static int g_thread;

struct full { struct full *next; uint8_t *buf; size_t size, used; };
static struct full *g_full, **g_full_tail = &g_full;

/* interned kernel names (records point at them) */
#define MAXNAMES 512
static struct { const void *func; char *name; } g_names[MAXNAMES];
static int g_nnames;

static const char *kernel_name(const struct argus_sim_activity *a)
{
    if (a->name)
        return a->name;
    if (!a->func)
        return "unnamed_kernel";
    for (int i = 0; i < g_nnames; i++)
        if (g_names[i].func == a->func)
            return g_names[i].name;
    char tmp[96];
    Dl_info info;
    if (dladdr(a->func, &info) && info.dli_sname && info.dli_saddr == a->func)
        snprintf(tmp, sizeof tmp, "%s", info.dli_sname);
    else if (dladdr(a->func, &info))
        snprintf(tmp, sizeof tmp, "kernel_%lx",
                 (unsigned long)((const char *)a->func - (const char *)info.dli_fbase));
    else
        snprintf(tmp, sizeof tmp, "kernel_%p", a->func);
    if (g_nnames == MAXNAMES)
        return "unnamed_kernel";
    g_names[g_nnames].func = a->func;
    g_names[g_nnames].name = strdup(tmp);
    return g_names[g_nnames++].name ? g_names[g_nnames - 1].name : "unnamed_kernel";
}

/* L held: hand the current buffer to the delivery list */
static void retire_locked(void)
{
    if (!g_buf)
        return;
    struct full *f = malloc(sizeof *f);
    if (f) {
        *f = (struct full){ NULL, g_buf, g_size, g_used };
        *g_full_tail = f;
        g_full_tail = &f->next;
        pthread_cond_signal(&g_full_cv);
    }
    g_buf = NULL;
    g_size = g_used = 0;
}

/* L held: room for n bytes in the current buffer (asks the client for one) */
static uint8_t *room_locked(size_t n)
{
    if (g_buf && g_used + n > g_size)
        retire_locked();
    if (!g_buf) {
        uint8_t *b = NULL;
        size_t sz = 0, maxrec = 0;
        g_req(&b, &sz, &maxrec);
        if (!b || sz < n)
            return NULL;
        g_buf = b;
        g_size = sz;
        g_used = 0;
    }
    uint8_t *p = g_buf + g_used;
    g_used += (n + 7) & ~(size_t)7;
    return p;
}

static void on_activity(const struct argus_sim_activity *a)
{
    int kernel = a->kind == ARGUS_SIM_ACT_KERNEL || a->kind == ARGUS_SIM_ACT_NCCL;
    if ((kernel && !__atomic_load_n(&g_on_kernel, __ATOMIC_RELAXED)) ||
        (a->kind == ARGUS_SIM_ACT_MEMCPY && !__atomic_load_n(&g_on_memcpy, __ATOMIC_RELAXED)) ||
        (a->kind == ARGUS_SIM_ACT_MEMSET && !__atomic_load_n(&g_on_memset, __ATOMIC_RELAXED)))
        return;
    pthread_mutex_lock(&L);
    if (kernel) {
        CUpti_ActivityKernel4 *k = (void *)room_locked(sizeof *k);
        if (!k)
            goto drop;
        memset(k, 0, sizeof *k);
        k->kind = CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL;
        k->start = a->start_ns;
        k->end = a->end_ns;
        k->completed = a->end_ns;
        k->deviceId = a->device;
        k->contextId = 1;
        k->streamId = a->stream_id;
        k->correlationId = a->correlation_id;
        uint64_t threads = a->threads;
        k->blockX = threads >= 256 ? 256 : (int32_t)(threads ? threads : 1);
        k->blockY = k->blockZ = k->gridY = k->gridZ = 1;
        k->gridX = (int32_t)(threads / (uint64_t)k->blockX);
        k->name = kernel_name(a);
    } else if (a->kind == ARGUS_SIM_ACT_MEMCPY) {
        CUpti_ActivityMemcpy *m = (void *)room_locked(sizeof *m);
        if (!m)
            goto drop;
        memset(m, 0, sizeof *m);
        m->kind = CUPTI_ACTIVITY_KIND_MEMCPY;
        m->bytes = a->bytes;
        m->start = a->start_ns;
        m->end = a->end_ns;
        m->deviceId = a->device;
        m->contextId = 1;
        m->streamId = a->stream_id;
        m->correlationId = a->correlation_id;
    } else if (a->kind == ARGUS_SIM_ACT_MEMSET) {
        CUpti_ActivityMemset *m = (void *)room_locked(sizeof *m);
        if (!m)
            goto drop;
        memset(m, 0, sizeof *m);
        m->kind = CUPTI_ACTIVITY_KIND_MEMSET;
        m->bytes = a->bytes;
        m->start = a->start_ns;
        m->end = a->end_ns;
        m->deviceId = a->device;
        m->contextId = 1;
        m->streamId = a->stream_id;
        m->correlationId = a->correlation_id;
    }
    pthread_mutex_unlock(&L);
    return;
drop:
    g_dropped++;
    pthread_mutex_unlock(&L);
}

static void deliver(struct full *list)
{
    while (list) {
        struct full *f = list;
        list = f->next;
        g_done(NULL, 0, f->buf, f->size, f->used);
        free(f);
    }
}

static void *delivery_thread(void *arg)
{
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&L);
        while (!g_full)
            pthread_cond_wait(&g_full_cv, &L);
        struct full *list = g_full;
        g_full = NULL;
        g_full_tail = &g_full;
        g_inflight++;
        pthread_mutex_unlock(&L);
        deliver(list);
        pthread_mutex_lock(&L);
        g_inflight--;
        pthread_cond_broadcast(&g_idle_cv);
        pthread_mutex_unlock(&L);
    }
    return NULL;
}

EXPORT CUptiResult cuptiActivityRegisterCallbacks(CUpti_BuffersCallbackRequestFunc req,
                                                  CUpti_BuffersCallbackCompleteFunc done)
{
    if (!req || !done)
        return CUPTI_ERROR_INVALID_PARAMETER;
    pthread_mutex_lock(&L);
    g_req = req;
    g_done = done;
    if (!g_thread) {
        pthread_t t;
        if (pthread_create(&t, NULL, delivery_thread, NULL) == 0) {
            pthread_detach(t);
            g_thread = 1;
        }
    }
    pthread_mutex_unlock(&L);
    return CUPTI_SUCCESS;
}

/* the hook is set while any kind is on */
static void update_hook(void)
{
    int any = __atomic_load_n(&g_on_kernel, __ATOMIC_RELAXED) |
              __atomic_load_n(&g_on_memcpy, __ATOMIC_RELAXED) |
              __atomic_load_n(&g_on_memset, __ATOMIC_RELAXED);
    argus_sim_set_activity_hook(any ? on_activity : NULL);
}

static int *flag_of(CUpti_ActivityKind kind)
{
    switch (kind) {
    case CUPTI_ACTIVITY_KIND_KERNEL:
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: return &g_on_kernel;
    case CUPTI_ACTIVITY_KIND_MEMCPY: return &g_on_memcpy;
    case CUPTI_ACTIVITY_KIND_MEMSET: return &g_on_memset;
    default: return NULL;
    }
}

EXPORT CUptiResult cuptiActivityEnable(CUpti_ActivityKind kind)
{
    int *f = flag_of(kind);
    if (!f)
        return CUPTI_ERROR_INVALID_PARAMETER;
    if (!g_req)
        return CUPTI_ERROR_NOT_INITIALIZED;
    __atomic_store_n(f, 1, __ATOMIC_RELAXED);
    update_hook();
    return CUPTI_SUCCESS;
}

EXPORT CUptiResult cuptiActivityDisable(CUpti_ActivityKind kind)
{
    int *f = flag_of(kind);
    if (!f)
        return CUPTI_ERROR_INVALID_PARAMETER;
    __atomic_store_n(f, 0, __ATOMIC_RELAXED);
    update_hook();
    return CUPTI_SUCCESS;
}

static size_t record_size(const CUpti_Activity *a)
{
    switch (a->kind) {
    case CUPTI_ACTIVITY_KIND_KERNEL:
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: return sizeof(CUpti_ActivityKernel4);
    case CUPTI_ACTIVITY_KIND_MEMCPY: return sizeof(CUpti_ActivityMemcpy);
    case CUPTI_ACTIVITY_KIND_MEMSET: return sizeof(CUpti_ActivityMemset);
    default: return 0;
    }
}

EXPORT CUptiResult cuptiActivityGetNextRecord(uint8_t *buffer, size_t valid,
                                              CUpti_Activity **record)
{
    if (!buffer || !record)
        return CUPTI_ERROR_INVALID_PARAMETER;
    size_t off = 0;
    if (*record) {
        size_t n = record_size(*record);
        if (!n)
            return CUPTI_ERROR_INVALID_PARAMETER;
        off = (size_t)((uint8_t *)*record - buffer) + ((n + 7) & ~(size_t)7);
    }
    if (off + sizeof(CUpti_Activity) > valid)
        return CUPTI_ERROR_MAX_LIMIT_REACHED;
    CUpti_Activity *a = (CUpti_Activity *)(buffer + off);
    if (!record_size(a) || off + record_size(a) > valid)
        return CUPTI_ERROR_MAX_LIMIT_REACHED;
    *record = a;
    return CUPTI_SUCCESS;
}

EXPORT CUptiResult cuptiActivityFlushAll(uint32_t flag)
{
    (void)flag;
    if (!g_done)
        return CUPTI_SUCCESS;
    pthread_mutex_lock(&L);
    if (g_buf && g_used)
        retire_locked();
    struct full *list = g_full;
    g_full = NULL;
    g_full_tail = &g_full;
    pthread_mutex_unlock(&L);
    deliver(list);
    /* synchronous: every record made before the call has reached the client on return */
    pthread_mutex_lock(&L);
    while (g_inflight > 0)
        pthread_cond_wait(&g_idle_cv, &L);
    pthread_mutex_unlock(&L);
    return CUPTI_SUCCESS;
}

EXPORT CUptiResult cuptiActivityGetNumDroppedRecords(CUpti_Context ctx, uint32_t stream,
                                                     size_t *dropped)
{
    (void)ctx; (void)stream;
    if (!dropped)
        return CUPTI_ERROR_INVALID_PARAMETER;
    pthread_mutex_lock(&L);
    *dropped = g_dropped;
    g_dropped = 0;
    pthread_mutex_unlock(&L);
    return CUPTI_SUCCESS;
}

EXPORT CUptiResult cuptiGetTimestamp(uint64_t *timestamp)
{
    if (!timestamp)
        return CUPTI_ERROR_INVALID_PARAMETER;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    *timestamp = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    return CUPTI_SUCCESS;
}
