/*
 * argus_gpu_ring.h - the layout of the control + record ring that libargus_gpu_agent.so
 * shares with argus: one file per process, /dev/shm/argus-gpu-<tgid>, mode 0600, fixed
 * size (header + capacity records), created at the agent's first init.
 *
 * Mirrored once in Python: argus/collect/gpu_agent.py (HEADER_FIELDS, RECORD_FIELDS); the
 * unit test tests/unit/test_gpu_agent.py compiles a C program printing sizeof/offsetof and
 * compares them with the mirror.
 *
 * Protocol
 *  - `enabled` is written by the reader only (1: argus is attached, 0: detached); it is a
 *    futex word: a reader may FUTEX_WAKE it, the agent also re-reads it every 100 ms.
 *  - `active` is written by the agent only: the ARGUS_GPU_ACTIVE_* bits of what it has
 *    switched on after seeing `enabled` (the acknowledgement a reader waits for).
 *  - The ring is a bounded multi-producer single-consumer queue (Vyukov): slot i's `seq`
 *    starts at i; a producer claims position p with a CAS on `head` when slot p's seq == p,
 *    writes the record, then stores seq = p + 1 (release). The reader consumes position
 *    `tail` when its slot's seq == tail + 1, then stores seq = tail + capacity and advances
 *    `tail`. A producer that finds the ring full drops the record and counts it in
 *    `dropped` (never blocks, never allocates).
 *  - Times are device nanoseconds as the source reports them (CUPTI start/end, NCCL
 *    KernelCh pTimer = GPU globaltimer); in the simulator both are CLOCK_MONOTONIC ns. At
 *    each enable the agent measures clock_offset_ns (CLOCK_MONOTONIC - device time): a
 *    reader adds it to every record's times to put them on the node's monotonic clock.
 */
#ifndef ARGUS_GPU_RING_H
#define ARGUS_GPU_RING_H

#include <stdint.h>

#define ARGUS_GPU_MAGIC 0x3155504753524741ULL /* "ARGSGPU1" little-endian */
#define ARGUS_GPU_VERSION 1
#define ARGUS_GPU_HDR_BYTES 256
#define ARGUS_GPU_NAME_LEN 32
#define ARGUS_GPU_DEFAULT_RECORDS 16384 /* 16384 x 104 B = 1.6 MiB per process */
#define ARGUS_GPU_MAX_RECORDS (1u << 20)

/* header.loaded: which entry points have run in this process */
#define ARGUS_GPU_LOADED_NCCL 0x1u    /* NCCL called the profiler plugin's init */
#define ARGUS_GPU_LOADED_CUPTI 0x2u   /* InitializeInjection ran and CUPTI callbacks are registered */
/* header.active: what the agent has switched on (0 while dormant) */
#define ARGUS_GPU_ACTIVE_NCCL 0x1u    /* the plugin's event mask is non-zero */
#define ARGUS_GPU_ACTIVE_CUPTI 0x2u   /* the CUPTI activity kinds are enabled */

/* header.clock_source: what clock_offset_ns relates CLOCK_MONOTONIC to (stored before
 * `active` is acknowledged, so a reader that saw `active` reads the offset of this enable) */
#define ARGUS_GPU_CLOCK_NONE 0u      /* not measured (dormant so far): device = CLOCK_MONOTONIC */
#define ARGUS_GPU_CLOCK_CUPTI 1u     /* cuptiGetTimestamp, bracketed by two clock_gettime */
#define ARGUS_GPU_CLOCK_REALTIME 2u  /* no CUPTI: the NCCL GPU timer taken as CLOCK_REALTIME */

/* record.kind */
enum {
    ARGUS_GPU_REC_KERNEL = 1,   /* CUPTI kernel / concurrent kernel */
    ARGUS_GPU_REC_MEMCPY = 2,   /* CUPTI memcpy */
    ARGUS_GPU_REC_MEMSET = 3,   /* CUPTI memset */
    ARGUS_GPU_REC_COLL = 4,     /* NCCL collective, one record per KernelCh (channel) */
    ARGUS_GPU_REC_P2P = 5,      /* NCCL send/recv, one record per KernelCh (channel) */
};

/* record.op for COLL/P2P: the NCCL function */
enum {
    ARGUS_GPU_OP_UNKNOWN = 0, ARGUS_GPU_OP_ALLREDUCE, ARGUS_GPU_OP_ALLGATHER,
    ARGUS_GPU_OP_REDUCESCATTER, ARGUS_GPU_OP_BROADCAST, ARGUS_GPU_OP_REDUCE,
    ARGUS_GPU_OP_SEND, ARGUS_GPU_OP_RECV, ARGUS_GPU_OP_ALLTOALL,
};

struct argus_gpu_hdr {
    uint64_t magic;           /* ARGUS_GPU_MAGIC, stored last (release) */
    uint32_t version;         /* ARGUS_GPU_VERSION */
    uint32_t hdr_bytes;       /* ARGUS_GPU_HDR_BYTES: records start here */
    uint32_t rec_bytes;       /* sizeof(struct argus_gpu_rec) */
    uint32_t capacity;        /* records, a power of two */
    int32_t tgid;             /* the process that owns the file */
    uint32_t loaded;          /* ARGUS_GPU_LOADED_* */
    uint32_t enabled;         /* reader -> agent (futex word) */
    uint32_t active;          /* agent -> reader: ARGUS_GPU_ACTIVE_* */
    uint32_t nccl_version;    /* profiler API version NCCL picked (4 or 5), 0 = none */
    uint32_t nccl_comms;      /* plugin contexts alive (communicators) */
    uint64_t head;            /* next position producers claim */
    uint64_t tail;            /* next position the reader consumes */
    uint64_t written;         /* records published */
    uint64_t dropped;         /* records lost: ring full */
    uint64_t cupti_dropped;   /* records CUPTI itself dropped (no buffer) */
    uint64_t enables;         /* times the agent switched on */
    uint64_t created_ns;      /* CLOCK_MONOTONIC at creation */
    int64_t clock_offset_ns;  /* CLOCK_MONOTONIC - device timestamp, measured at enable */
    uint32_t clock_source;    /* ARGUS_GPU_CLOCK_*: how clock_offset_ns was measured */
    uint32_t clock_error_ns;  /* half the window of the best measurement */
    uint8_t reserved[ARGUS_GPU_HDR_BYTES - 120];
};

struct argus_gpu_rec {
    uint64_t seq;             /* ring slot sequence (see above) */
    uint16_t kind;            /* ARGUS_GPU_REC_* */
    uint16_t channel;         /* NCCL channel id (KernelCh) */
    uint8_t op;               /* ARGUS_GPU_OP_* */
    uint8_t flags;
    uint16_t device;          /* CUPTI deviceId */
    uint32_t stream;          /* CUPTI streamId */
    uint32_t correlation;     /* CUPTI correlationId */
    uint64_t ts_start_ns;
    uint64_t ts_end_ns;
    uint64_t comm_hash;       /* NCCL commHash (v4) / commId (v5) */
    uint64_t coll_seq;        /* NCCL coll.seqNumber; p2p: 0 */
    uint64_t bytes;           /* memcpy/memset bytes; NCCL count x datatype size */
    int32_t peer;             /* p2p peer, -1 otherwise */
    uint32_t reserved;
    char name[ARGUS_GPU_NAME_LEN]; /* kernel name (truncated) or NCCL function */
};

_Static_assert(sizeof(struct argus_gpu_hdr) == ARGUS_GPU_HDR_BYTES, "header size");
_Static_assert(sizeof(struct argus_gpu_rec) == 104, "record size");

#endif
