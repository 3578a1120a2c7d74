/*
 * cupti_subset.h - argus's own declarations of the subset of CUPTI's activity API that
 * libargus_gpu_agent.so uses and the stand-in libcupti.so.12 implements. Written from
 * CUPTI's published cupti_activity.h / cupti_result.h (CUDA 12.x): activity kinds, result
 * codes, the buffer callbacks, and the leading fields of CUpti_ActivityKernel4 (the prefix
 * later kernel record versions keep), CUpti_ActivityMemcpy and CUpti_ActivityMemset
 * (records are packed, 8-byte aligned).
 *
 * Loading: the CUDA driver dlopens CUDA_INJECTION64_PATH at CUDA initialisation and calls
 * its `int InitializeInjection(void)`; the injected library then registers its buffer
 * callbacks and enables activity kinds.
 */
#ifndef ARGUS_CUPTI_SUBSET_H
#define ARGUS_CUPTI_SUBSET_H

#include <stddef.h>
#include <stdint.h>

typedef int CUptiResult;
#define CUPTI_SUCCESS 0
#define CUPTI_ERROR_INVALID_PARAMETER 1
#define CUPTI_ERROR_MAX_LIMIT_REACHED 12
#define CUPTI_ERROR_NOT_INITIALIZED 15

typedef int CUpti_ActivityKind;
#define CUPTI_ACTIVITY_KIND_MEMCPY 1
#define CUPTI_ACTIVITY_KIND_MEMSET 2
#define CUPTI_ACTIVITY_KIND_KERNEL 3
#define CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL 10

#define CUPTI_ACTIVITY_FLAG_FLUSH_FORCED (1u << 0)

typedef struct CUctx_st *CUpti_Context; /* CUcontext */

typedef void (*CUpti_BuffersCallbackRequestFunc)(uint8_t **buffer, size_t *size,
                                                 size_t *maxNumRecords);
typedef void (*CUpti_BuffersCallbackCompleteFunc)(CUpti_Context context, uint32_t streamId,
                                                  uint8_t *buffer, size_t size,
                                                  size_t validSize);

#define ARGUS_CUPTI_PACKED __attribute__((__packed__)) __attribute__((aligned(8)))

typedef struct ARGUS_CUPTI_PACKED {
    CUpti_ActivityKind kind;
} CUpti_Activity;

/* CUpti_ActivityKernel4 (the fields up to sharedMemoryExecuted; 144 bytes) */
typedef struct ARGUS_CUPTI_PACKED {
    CUpti_ActivityKind kind;
    uint8_t cacheConfig;
    uint8_t sharedMemoryConfig;
    uint16_t registersPerThread;
    int32_t partitionedGlobalCacheRequested;
    int32_t partitionedGlobalCacheExecuted;
    uint64_t start;
    uint64_t end;
    uint64_t completed;
    uint32_t deviceId;
    uint32_t contextId;
    uint32_t streamId;
    int32_t gridX, gridY, gridZ;
    int32_t blockX, blockY, blockZ;
    int32_t staticSharedMemory;
    int32_t dynamicSharedMemory;
    uint32_t localMemoryPerThread;
    uint32_t localMemoryTotal;
    uint32_t correlationId;
    int64_t gridId;
    const char *name;
    void *reserved0;
    uint64_t queued;
    uint64_t submitted;
    uint8_t launchType;
    uint8_t isSharedMemoryCarveoutRequested;
    uint8_t sharedMemoryCarveoutRequested;
    uint8_t padding;
    uint32_t sharedMemoryExecuted;
} CUpti_ActivityKernel4;

typedef struct ARGUS_CUPTI_PACKED {
    CUpti_ActivityKind kind;
    uint8_t copyKind;
    uint8_t srcKind;
    uint8_t dstKind;
    uint8_t flags;
    uint64_t bytes;
    uint64_t start;
    uint64_t end;
    uint32_t deviceId;
    uint32_t contextId;
    uint32_t streamId;
    uint32_t correlationId;
    uint32_t runtimeCorrelationId;
    uint32_t pad;
    void *reserved0;
} CUpti_ActivityMemcpy;

typedef struct ARGUS_CUPTI_PACKED {
    CUpti_ActivityKind kind;
    uint32_t value;
    uint64_t bytes;
    uint64_t start;
    uint64_t end;
    uint32_t deviceId;
    uint32_t contextId;
    uint32_t streamId;
    uint32_t correlationId;
    uint16_t flags;
    uint16_t memoryKind;
    uint32_t pad;
    void *reserved0;
} CUpti_ActivityMemset;

_Static_assert(sizeof(CUpti_ActivityKernel4) == 144, "CUpti_ActivityKernel4 layout");
_Static_assert(sizeof(CUpti_ActivityMemcpy) == 64, "CUpti_ActivityMemcpy layout");
_Static_assert(sizeof(CUpti_ActivityMemset) == 64, "CUpti_ActivityMemset layout");

/* the functions the agent resolves with dlsym (it does not link libcupti) */
typedef CUptiResult (*cuptiActivityRegisterCallbacks_fn)(CUpti_BuffersCallbackRequestFunc,
                                                        CUpti_BuffersCallbackCompleteFunc);
typedef CUptiResult (*cuptiActivityEnable_fn)(CUpti_ActivityKind kind);
typedef CUptiResult (*cuptiActivityDisable_fn)(CUpti_ActivityKind kind);
typedef CUptiResult (*cuptiActivityGetNextRecord_fn)(uint8_t *buffer, size_t validBufferSizeBytes,
                                                    CUpti_Activity **record);
typedef CUptiResult (*cuptiActivityFlushAll_fn)(uint32_t flag);
typedef CUptiResult (*cuptiGetTimestamp_fn)(uint64_t *timestamp);
typedef CUptiResult (*cuptiActivityGetNumDroppedRecords_fn)(CUpti_Context context,
                                                           uint32_t streamId, size_t *dropped);

#endif
