/*
 * nccl.c - stand-in libnccl.so.2 (reports version 2.21.5). Collectives and p2p are
 * enqueued on the caller's stream and complete when every rank of the communicator
 * (or the peer) has reached them; see simgpu.c for the timing rule.
 */
#include <stdlib.h>
#include <string.h>

#include "sim_nccl.h"
#include "simgpu.h"

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
    return *comm ? ncclSuccess : ncclSystemError;
}

static ncclResult_t enqueue(ncclComm_t comm, int kind, size_t count, ncclDataType_t dt, int peer,
                            cudaStream_t stream)
{
    if (!comm || !dtsize(dt))
        return ncclInvalidArgument;
    argus_sim_enqueue_nccl(C(comm), kind, (unsigned long long)count * dtsize(dt), peer,
                           argus_sim_stream_resolve((void *)stream, 0));
    return ncclSuccess;
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
    return (*newcomm || color == NCCL_SPLIT_NOCOLOR) ? ncclSuccess : ncclSystemError;
}

ARGUS_EXPORT ncclResult_t ncclCommDestroy(ncclComm_t comm)
{
    COUNT(ncclCommDestroy);
    argus_sim_comm_destroy(C(comm));
    return ncclSuccess;
}

ARGUS_EXPORT ncclResult_t ncclCommAbort(ncclComm_t comm)
{
    COUNT(ncclCommAbort);
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
    return enqueue(comm, ARGUS_COLL_ALLGATHER, sendcount * argus_sim_comm_nranks(C(comm)),
                   datatype, -1, stream);
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
    return enqueue(comm, ARGUS_COLL_REDUCESCATTER, recvcount * argus_sim_comm_nranks(C(comm)),
                   datatype, -1, stream);
}

ARGUS_EXPORT ncclResult_t ncclBroadcast(const void *sendbuff, void *recvbuff, size_t count,
                                        ncclDataType_t datatype, int root, ncclComm_t comm,
                                        cudaStream_t stream)
{
    COUNT(ncclBroadcast);
    (void)sendbuff; (void)recvbuff; (void)root;
    return enqueue(comm, ARGUS_COLL_BROADCAST, count, datatype, -1, stream);
}

ARGUS_EXPORT ncclResult_t ncclReduce(const void *sendbuff, void *recvbuff, size_t count,
                                     ncclDataType_t datatype, ncclRedOp_t op, int root,
                                     ncclComm_t comm, cudaStream_t stream)
{
    COUNT(ncclReduce);
    (void)sendbuff; (void)recvbuff; (void)op; (void)root;
    return enqueue(comm, ARGUS_COLL_REDUCE, count, datatype, -1, stream);
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
    argus_sim_group_start();
    return ncclSuccess;
}

ARGUS_EXPORT ncclResult_t ncclGroupEnd(void)
{
    COUNT(ncclGroupEnd);
    argus_sim_group_end();
    return ncclSuccess;
}
