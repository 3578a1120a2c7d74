/*
 * nccl.c - stand-in libnccl.so.2 (reports version 2.21.5). Collectives and p2p are
 * enqueued on the caller's stream and complete when every rank of the communicator
 * (or the peer) has reached them; see simgpu.c for the timing rule.
 *
 * Profiler plugin (NCCL_PROFILER_PLUGIN, as NCCL >= 2.23 loads it): at the first
 * communicator init the named library is dlopened (the name as given, then
 * libnccl-profiler-<name>.so) and the newest struct this stand-in knows is looked up,
 * "ncclProfiler_v5" then "ncclProfiler_v4" (ARGUS_SIM_NCCL_PROFILER_MAX=4 skips v5, to
 * exercise the older path). Per communicator: init(..., &mask, ...) at init, finalize at
 * destroy. The mask is one process-wide int the plugin may change at any time; it is
 * re-read at every group event (an outermost ncclGroupEnd, or a call outside a group):
 * mask 0 means no plugin call at all. With a non-zero mask, per group: startEvent(Group),
 * per operation startEvent(Coll|P2p, parent = group) with seqNumber / func / count /
 * datatype, stopEvent(op) once enqueued (host side), stopEvent(group); when the operation's
 * kernel has run on the simulated GPU (the stream worker): startEvent(KernelCh, parent = op,
 * channelId 0, pTimer = device start), recordEventState(KernelChStop, pTimer = device end),
 * stopEvent(KernelCh). The plugin must keep an op's handle alive until its KernelCh events
 * are stopped (NCCL's contract: stopEvent of a collective only means "enqueued").
 * Not emitted: v5 API / kernel-launch events, ProxyOp/ProxyStep/ProxyCtrl events.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sim_nccl.h"
#include "simgpu.h"
#include "../agent/nccl_profiler.h"

#define NCCL_SYMBOLS(X) \
    X(ncclGetVersion) X(ncclGetUniqueId) X(ncclCommInitRank) X(ncclCommInitRankConfig) \
    X(ncclCommInitAll) X(ncclCommSplit) X(ncclCommDestroy) X(ncclCommAbort) X(ncclCommCount) \
    X(ncclCommUserRank) X(ncclCommCuDevice) X(ncclCommGetAsyncError) X(ncclGetErrorString) \
    X(ncclAllReduce) X(ncclAllGather) X(ncclReduceScatter) X(ncclBroadcast) X(ncclReduce) \
    X(ncclSend) X(ncclRecv) X(ncclGroupStart) X(ncclGroupEnd)

#define X_ENUM(n) C_##n,
#define X_NAME(n) #n,
enum { NCCL_SYMBOLS(X_ENUM) C_COUNT };
static const char *const names[] = { NCCL_SYMBOLS(X_NAME) };
static unsigned long long counts[C_COUNT];
#define COUNT(n) ARGUS_COUNT(counts, C_##n)

__attribute__((constructor)) static void nccl_init(void)
{
    argus_sim_register_counters("libnccl.so.2", names, counts, C_COUNT);
}

#define C(comm) ((argus_sim_comm *)(comm))

/* ------------------------------------------------------------ profiler plugin */
static pthread_once_t g_prof_once = PTHREAD_ONCE_INIT;
static int g_prof_ver;            /* 0: none, 4 or 5 */
static ncclProfiler_v4_t *g_p4;
static ncclProfiler_v5_t *g_p5;
static int g_prof_mask;           /* NCCL's eActivationMask, handed to init */
static pthread_mutex_t g_prof_lock = PTHREAD_MUTEX_INITIALIZER;
#define MAXCOMMS 256
static struct { argus_sim_comm *c; void *ctx; } g_prof_comms[MAXCOMMS];

static void prof_load(void)
{
    const char *name = getenv("NCCL_PROFILER_PLUGIN");
    if (!name || !*name)
        return;
    void *lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        char alt[4096];
        snprintf(alt, sizeof alt, "libnccl-profiler-%s.so", name);
        lib = dlopen(alt, RTLD_NOW | RTLD_LOCAL);
    }
    if (!lib)
        return;
    const char *max = getenv("ARGUS_SIM_NCCL_PROFILER_MAX");
    if (!(max && atoi(max) == 4))
        g_p5 = dlsym(lib, "ncclProfiler_v5");
    if (g_p5) {
        g_prof_ver = 5;
        return;
    }
    g_p4 = dlsym(lib, "ncclProfiler_v4");
    if (g_p4)
        g_prof_ver = 4;
}

static void prof_log(int level, unsigned long flags, const char *file, int line, const char *fmt,
                     ...)
{
    (void)level; (void)flags; (void)file; (void)line; (void)fmt;
}

static void **prof_slot(argus_sim_comm *c, int create)
{
    for (int i = 0; i < MAXCOMMS; i++)
        if (g_prof_comms[i].c == c)
            return &g_prof_comms[i].ctx;
    if (!create)
        return NULL;
    for (int i = 0; i < MAXCOMMS; i++)
        if (!g_prof_comms[i].c) {
            g_prof_comms[i].c = c;
            return &g_prof_comms[i].ctx;
        }
    return NULL;
}

static void prof_comm_init(argus_sim_comm *c)
{
    pthread_once(&g_prof_once, prof_load);
    if (!g_prof_ver || !c)
        return;
    void *ctx = NULL;
    char name[64];
    uint64_t hash = argus_sim_comm_hash(c);
    snprintf(name, sizeof name, "argus-sim-%016llx", (unsigned long long)hash);
    int n = argus_sim_comm_nranks(c), r = argus_sim_comm_rank(c);
    ncclResult_t rc = g_prof_ver == 5
        ? g_p5->init(&ctx, hash, &g_prof_mask, name, 1, n, r, prof_log)
        : g_p4->init(&ctx, &g_prof_mask, name, hash, 1, n, r, prof_log);
    if (rc != ncclSuccess)
        return;
    pthread_mutex_lock(&g_prof_lock);
    void **slot = prof_slot(c, 1);
    if (slot)
        *slot = ctx;
    pthread_mutex_unlock(&g_prof_lock);
}

static void prof_comm_fini(argus_sim_comm *c)
{
    if (!g_prof_ver || !c)
        return;
    pthread_mutex_lock(&g_prof_lock);
    void **slot = prof_slot(c, 0);
    void *ctx = slot ? *slot : NULL;
    if (slot) {
        *slot = NULL;
        for (int i = 0; i < MAXCOMMS; i++)
            if (g_prof_comms[i].c == c)
                g_prof_comms[i].c = NULL;
    }
    pthread_mutex_unlock(&g_prof_lock);
    if (ctx)
        (g_prof_ver == 5 ? g_p5->finalize : g_p4->finalize)(ctx);
}

static void *prof_ctx(argus_sim_comm *c)
{
    pthread_mutex_lock(&g_prof_lock);
    void **slot = prof_slot(c, 0);
    void *ctx = slot ? *slot : NULL;
    pthread_mutex_unlock(&g_prof_lock);
    return ctx;
}

static const char *const k_funcs[] = { "AllReduce", "AllGather", "ReduceScatter", "Broadcast",
                                       "Reduce", "Send", "Recv" };
static const char *const k_dtypes[] = { "ncclInt8", "ncclUint8", "ncclInt32", "ncclUint32",
                                        "ncclInt64", "ncclUint64", "ncclFloat16", "ncclFloat32",
                                        "ncclFloat64", "ncclBfloat16" };

/* one operation of a group, from the call to its KernelCh events */
struct prof_task {
    struct prof_task *next;
    argus_sim_comm *c;
    void *ctx;
    int kind, peer, root, rank, mask;
    size_t count;
    ncclDataType_t dt;
    uint64_t seq;
    void *handle;            /* the plugin's Coll/P2p handle */
};

static __thread struct prof_task *t_tasks, *t_tasks_last;
static __thread int t_depth;

/* KernelCh events of one finished operation (stream worker thread) */
static void prof_done(void *user, uint64_t start, uint64_t end)
{
    struct prof_task *t = user;
    if ((t->mask & ncclProfileKernelCh) && t->handle) {
        void *kh = NULL;
        if (g_prof_ver == 5) {
            ncclProfilerEventDescr_v5_t d;
            memset(&d, 0, sizeof d);
            d.type = ncclProfileKernelCh;
            d.parentObj = t->handle;
            d.rank = t->rank;
            d.kernelCh.channelId = 0;
            d.kernelCh.pTimer = start;
            g_p5->startEvent(t->ctx, &kh, &d);
            if (kh) {
                ncclProfilerEventStateArgs_v5_t a = { .kernelCh = { end } };
                g_p5->recordEventState(kh, ncclProfilerKernelChStop, &a);
                g_p5->stopEvent(kh);
            }
        } else {
            ncclProfilerEventDescr_v4_t d;
            memset(&d, 0, sizeof d);
            d.type = ncclProfileKernelCh;
            d.parentObj = t->handle;
            d.rank = t->rank;
            d.kernelCh.channelId = 0;
            d.kernelCh.pTimer = start;
            g_p4->startEvent(t->ctx, &kh, &d);
            if (kh) {
                ncclProfilerEventStateArgs_v4_t a = { .kernelCh = { end } };
                g_p4->recordEventState(kh, ncclProfilerKernelChStop, &a);
                g_p4->stopEvent(kh);
            }
        }
    }
    free(t);
}

static void prof_start_op(struct prof_task *t, void *group)
{
    int p2p = t->kind == ARGUS_P2P_SEND || t->kind == ARGUS_P2P_RECV;
    const char *func = k_funcs[t->kind];
    const char *dt = ((unsigned)t->dt < 10) ? k_dtypes[t->dt] : "ncclUnknown";
    if (g_prof_ver == 5) {
        ncclProfilerEventDescr_v5_t d;
        memset(&d, 0, sizeof d);
        d.type = p2p ? ncclProfileP2p : ncclProfileColl;
        d.parentObj = group;
        d.rank = t->rank;
        if (p2p) {
            d.p2p.func = func;
            d.p2p.datatype = dt;
            d.p2p.count = t->count;
            d.p2p.peer = t->peer;
            d.p2p.nChannels = 1;
            d.p2p.parentGroup = group;
        } else {
            d.coll.seqNumber = t->seq;
            d.coll.func = func;
            d.coll.count = t->count;
            d.coll.root = t->root;
            d.coll.datatype = dt;
            d.coll.nChannels = 1;
            d.coll.nWarps = 16;
            d.coll.algo = "RING";
            d.coll.proto = "SIMPLE";
            d.coll.parentGroup = group;
        }
        g_p5->startEvent(t->ctx, &t->handle, &d);
    } else {
        ncclProfilerEventDescr_v4_t d;
        memset(&d, 0, sizeof d);
        d.type = p2p ? ncclProfileP2p : ncclProfileColl;
        d.parentObj = group;
        d.rank = t->rank;
        if (p2p) {
            d.p2p.func = func;
            d.p2p.datatype = dt;
            d.p2p.count = t->count;
            d.p2p.peer = t->peer;
            d.p2p.nChannels = 1;
        } else {
            d.coll.seqNumber = t->seq;
            d.coll.func = func;
            d.coll.count = t->count;
            d.coll.root = t->root;
            d.coll.datatype = dt;
            d.coll.nChannels = 1;
            d.coll.nWarps = 16;
            d.coll.algo = "RING";
            d.coll.proto = "SIMPLE";
        }
        g_p4->startEvent(t->ctx, &t->handle, &d);
    }
}

static void prof_stop(void *h)
{
    if (h)
        (g_prof_ver == 5 ? g_p5->stopEvent : g_p4->stopEvent)(h);
}

/* The group event: the tasks queued since the outermost ncclGroupStart (or the one call made
 * outside a group) get their host-side events; `launch` enqueues them on the engine. */
static void prof_group(struct prof_task *tasks, void (*launch)(void))
{
    int mask = __atomic_load_n(&g_prof_mask, __ATOMIC_RELAXED);
    void *group = NULL;
    int want = mask & (ncclProfileGroup | ncclProfileColl | ncclProfileP2p | ncclProfileKernelCh);
    if (want && tasks) {
        if (g_prof_ver == 5) {
            ncclProfilerEventDescr_v5_t d;
            memset(&d, 0, sizeof d);
            d.type = ncclProfileGroup;
            d.rank = tasks->rank;
            g_p5->startEvent(tasks->ctx, &group, &d);
        } else {
            ncclProfilerEventDescr_v4_t d;
            memset(&d, 0, sizeof d);
            d.type = ncclProfileGroup;
            d.rank = tasks->rank;
            g_p4->startEvent(tasks->ctx, &group, &d);
        }
    }
    int n = 0;
    for (struct prof_task *t = tasks; t; t = t->next)
        n++;
    void **handles = calloc((size_t)n + 1, sizeof *handles);
    int nh = 0;
    for (struct prof_task *t = tasks; t; t = t->next) {
        t->mask = mask;
        if (want && t->ctx)
            prof_start_op(t, group);
        if (handles)
            handles[nh++] = t->handle;
    }
    launch();   /* after this the tasks belong to the engine (prof_done frees them) */
    for (int i = 0; i < nh; i++)
        prof_stop(handles[i]);
    free(handles);
    prof_stop(group);
}

static size_t dtsize(ncclDataType_t t)
{
    static const size_t sz[] = { 1, 1, 4, 4, 8, 8, 2, 4, 8, 2 };
    return ((unsigned)t < 10) ? sz[t] : 0;
}

static ncclResult_t init_rank(ncclComm_t *comm, int nranks, const ncclUniqueId *id, int rank)
{
    if (!comm || nranks < 1 || rank < 0 || rank >= nranks)
        return ncclInvalidArgument;
    *comm = (ncclComm_t)argus_sim_comm_init((const unsigned char *)id->internal, nranks, rank,
                                            argus_sim_get_device());
    prof_comm_init(C(*comm));
    return *comm ? ncclSuccess : ncclSystemError;
}

static void launch_group(void) { argus_sim_group_end(); }


static ncclResult_t enqueue_root(ncclComm_t comm, int kind, size_t count, size_t total,
                                 ncclDataType_t dt, int peer, int root, cudaStream_t stream)
{
    if (!comm || !dtsize(dt))
        return ncclInvalidArgument;
    argus_sim_stream *s = argus_sim_stream_resolve((void *)stream, 0);
    /* A call outside a group is its own group event: with the mask 0 then, NCCL makes no
     * plugin call for it, so neither does this stand-in do any of the plugin's bookkeeping
     * (a dormant plugin costs a call nothing, as in NCCL). Inside a group the mask is read
     * at the outermost ncclGroupEnd. */
    int prof = g_prof_ver && (t_depth > 0 || __atomic_load_n(&g_prof_mask, __ATOMIC_RELAXED));
    void *ctx = prof ? prof_ctx(C(comm)) : NULL;
    if (!ctx) {
        argus_sim_enqueue_nccl(C(comm), kind, (unsigned long long)total * dtsize(dt), peer, s);
        return ncclSuccess;
    }
    struct prof_task *t = calloc(1, sizeof *t);
    if (!t)
        return ncclSystemError;
    if (t_depth == 0)
        argus_sim_group_start(); /* so the engine launches only after the host-side events */
    *t = (struct prof_task){ NULL, C(comm), ctx, kind, peer, root, argus_sim_comm_rank(C(comm)),
                             0, count, dt, argus_sim_comm_seq(C(comm)), NULL };
    argus_sim_enqueue_nccl_ex(C(comm), kind, (unsigned long long)total * dtsize(dt), peer, s,
                              prof_done, t);
    if (t_depth > 0) {
        /* inside a group: the engine holds the part until the outermost ncclGroupEnd */
        if (t_tasks)
            t_tasks_last->next = t;
        else
            t_tasks = t;
        t_tasks_last = t;
        return ncclSuccess;
    }
    /* outside a group: the call is its own group event (the engine's implicit group) */
    prof_group(t, launch_group);
    return ncclSuccess;
}

static ncclResult_t enqueue(ncclComm_t comm, int kind, size_t count, ncclDataType_t dt, int peer,
                            cudaStream_t stream)
{
    return enqueue_root(comm, kind, count, count, dt, peer, -1, stream);
}

ARGUS_EXPORT ncclResult_t ncclGetVersion(int *version)
{
    COUNT(ncclGetVersion);
    if (!version)
        return ncclInvalidArgument;
    *version = 22105;
    return ncclSuccess;
}

ARGUS_EXPORT ncclResult_t ncclGetUniqueId(ncclUniqueId *uniqueId)
{
    COUNT(ncclGetUniqueId);
    if (!uniqueId)
        return ncclInvalidArgument;
    argus_sim_unique_id((unsigned char *)uniqueId->internal);
    return ncclSuccess;
}

ARGUS_EXPORT ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId commId,
                                           int rank)
{
    COUNT(ncclCommInitRank);
    return init_rank(comm, nranks, &commId, rank);
}

ARGUS_EXPORT ncclResult_t ncclCommInitRankConfig(ncclComm_t *comm, int nranks,
                                                 ncclUniqueId commId, int rank,
                                                 ncclConfig_t *config)
{
    COUNT(ncclCommInitRankConfig);
    (void)config;
    return init_rank(comm, nranks, &commId, rank);
}

/* Single-process, multi-device: the comms share one fresh id; each joins without waiting
 * for the others (they are all in this process). */
ARGUS_EXPORT ncclResult_t ncclCommInitAll(ncclComm_t *comm, int ndev, const int *devlist)
{
    COUNT(ncclCommInitAll);
    if (!comm || ndev < 1)
        return ncclInvalidArgument;
    (void)devlist;
    ncclUniqueId id;
    argus_sim_unique_id((unsigned char *)id.internal);
    /* join all but the last without blocking is not possible with a blocking init, so
     * a single-rank communicator per device is returned; collectives on them complete
     * on their own (documented limitation). */
    for (int i = 0; i < ndev; i++) {
        ncclUniqueId one = id;
        one.internal[40] = (char)i;
        comm[i] = (ncclComm_t)argus_sim_comm_init((const unsigned char *)one.internal, 1, 0,
                                                  devlist ? devlist[i] : i);
        if (!comm[i])
            return ncclSystemError;
        prof_comm_init(C(comm[i]));
    }
    return ncclSuccess;
}

ARGUS_EXPORT ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t *newcomm,
                                        ncclConfig_t *config)
{
    COUNT(ncclCommSplit);
    (void)config;
    if (!comm || !newcomm)
        return ncclInvalidArgument;
    *newcomm = (ncclComm_t)argus_sim_comm_split(C(comm), color, key);
    prof_comm_init(C(*newcomm));
    return (*newcomm || color == NCCL_SPLIT_NOCOLOR) ? ncclSuccess : ncclSystemError;
}

ARGUS_EXPORT ncclResult_t ncclCommDestroy(ncclComm_t comm)
{
    COUNT(ncclCommDestroy);
    prof_comm_fini(C(comm));
    argus_sim_comm_destroy(C(comm));
    return ncclSuccess;
}

ARGUS_EXPORT ncclResult_t ncclCommAbort(ncclComm_t comm)
{
    COUNT(ncclCommAbort);
    prof_comm_fini(C(comm));
    argus_sim_comm_destroy(C(comm));
    return ncclSuccess;
}

ARGUS_EXPORT ncclResult_t ncclCommCount(const ncclComm_t comm, int *count)
{
    COUNT(ncclCommCount);
    if (!comm || !count)
        return ncclInvalidArgument;
    *count = argus_sim_comm_nranks(C(comm));
    return ncclSuccess;
}

ARGUS_EXPORT ncclResult_t ncclCommUserRank(const ncclComm_t comm, int *rank)
{
    COUNT(ncclCommUserRank);
    if (!comm || !rank)
        return ncclInvalidArgument;
    *rank = argus_sim_comm_rank(C(comm));
    return ncclSuccess;
}

ARGUS_EXPORT ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int *device)
{
    COUNT(ncclCommCuDevice);
    if (!comm || !device)
        return ncclInvalidArgument;
    *device = argus_sim_comm_device(C(comm));
    return ncclSuccess;
}

ARGUS_EXPORT ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *asyncError)
{
    COUNT(ncclCommGetAsyncError);
    if (!comm || !asyncError)
        return ncclInvalidArgument;
    *asyncError = ncclSuccess;
    return ncclSuccess;
}

ARGUS_EXPORT const char *ncclGetErrorString(ncclResult_t result)
{
    COUNT(ncclGetErrorString);
    switch (result) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error";
    case ncclSystemError: return "unhandled system error";
    case ncclInternalError: return "internal error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
    }
}

ARGUS_EXPORT ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count,
                                        ncclDataType_t datatype, ncclRedOp_t op,
                                        ncclComm_t comm, cudaStream_t stream)
{
    COUNT(ncclAllReduce);
    (void)sendbuff; (void)recvbuff; (void)op;
    return enqueue(comm, ARGUS_COLL_ALLREDUCE, count, datatype, -1, stream);
}

ARGUS_EXPORT ncclResult_t ncclAllGather(const void *sendbuff, void *recvbuff, size_t sendcount,
                                        ncclDataType_t datatype, ncclComm_t comm,
                                        cudaStream_t stream)
{
    COUNT(ncclAllGather);
    (void)sendbuff; (void)recvbuff;
    if (!comm)
        return ncclInvalidArgument;
    return enqueue_root(comm, ARGUS_COLL_ALLGATHER, sendcount,
                        sendcount * argus_sim_comm_nranks(C(comm)), datatype, -1, -1, stream);
}

ARGUS_EXPORT ncclResult_t ncclReduceScatter(const void *sendbuff, void *recvbuff,
                                            size_t recvcount, ncclDataType_t datatype,
                                            ncclRedOp_t op, ncclComm_t comm,
                                            cudaStream_t stream)
{
    COUNT(ncclReduceScatter);
    (void)sendbuff; (void)recvbuff; (void)op;
    if (!comm)
        return ncclInvalidArgument;
    return enqueue_root(comm, ARGUS_COLL_REDUCESCATTER, recvcount,
                        recvcount * argus_sim_comm_nranks(C(comm)), datatype, -1, -1, stream);
}

ARGUS_EXPORT ncclResult_t ncclBroadcast(const void *sendbuff, void *recvbuff, size_t count,
                                        ncclDataType_t datatype, int root, ncclComm_t comm,
                                        cudaStream_t stream)
{
    COUNT(ncclBroadcast);
    (void)sendbuff; (void)recvbuff;
    return enqueue_root(comm, ARGUS_COLL_BROADCAST, count, count, datatype, -1, root, stream);
}

ARGUS_EXPORT ncclResult_t ncclReduce(const void *sendbuff, void *recvbuff, size_t count,
                                     ncclDataType_t datatype, ncclRedOp_t op, int root,
                                     ncclComm_t comm, cudaStream_t stream)
{
    COUNT(ncclReduce);
    (void)sendbuff; (void)recvbuff; (void)op;
    return enqueue_root(comm, ARGUS_COLL_REDUCE, count, count, datatype, -1, root, stream);
}

ARGUS_EXPORT ncclResult_t ncclSend(const void *sendbuff, size_t count, ncclDataType_t datatype,
                                   int peer, ncclComm_t comm, cudaStream_t stream)
{
    COUNT(ncclSend);
    (void)sendbuff;
    if (!comm || peer < 0 || peer >= argus_sim_comm_nranks(C(comm)))
        return ncclInvalidArgument;
    return enqueue(comm, ARGUS_P2P_SEND, count, datatype, peer, stream);
}

ARGUS_EXPORT ncclResult_t ncclRecv(void *recvbuff, size_t count, ncclDataType_t datatype,
                                   int peer, ncclComm_t comm, cudaStream_t stream)
{
    COUNT(ncclRecv);
    (void)recvbuff;
    if (!comm || peer < 0 || peer >= argus_sim_comm_nranks(C(comm)))
        return ncclInvalidArgument;
    return enqueue(comm, ARGUS_P2P_RECV, count, datatype, peer, stream);
}

ARGUS_EXPORT ncclResult_t ncclGroupStart(void)
{
    COUNT(ncclGroupStart);
    t_depth++;
    argus_sim_group_start();
    return ncclSuccess;
}

ARGUS_EXPORT ncclResult_t ncclGroupEnd(void)
{
    COUNT(ncclGroupEnd);
    if (t_depth > 0 && --t_depth == 0 && t_tasks) {
        struct prof_task *tasks = t_tasks;
        t_tasks = t_tasks_last = NULL;
        prof_group(tasks, launch_group);
        return ncclSuccess;
    }
    argus_sim_group_end();
    return ncclSuccess;
}
