/*
 * bench_agent.c - argus-gpu-agent-bench: the GPU agent's cost per kernel launch or per
 * NCCL collective, measured over the stand-in libcudart / libnccl (the simulated GPU), in one
 * of three modes:
 *   none     no agent loaded
 *   dormant  the agent loaded, not enabled
 *   enabled  the agent loaded and enabled (this program sets `enabled` in its own
 *            /dev/shm/argus-gpu-<pid> and waits for the acknowledgement)
 * Usage: argus-gpu-agent-bench MODE N [AGENT.so [launch|coll]].
 *  launch (default): the agent through CUDA_INJECTION64_PATH only. Launches 1000 warm-up
 *   kernels, then N one-thread kernels (timed), then N/10 memsets and N/10 copies, on one
 *   stream.
 *  coll: the agent as `argus gpu-env` loads it (NCCL_PROFILER_PLUGIN and
 *   CUDA_INJECTION64_PATH), a one-rank communicator; 1000 warm-up ncclAllReduce calls of
 *   one float, then N (timed, each outside a group: its own group event, as DDP's are), on
 *   one stream. Enabled, each collective is two records: NCCL's KernelCh (channel 0) and
 *   CUPTI's record of its ncclDevKernel_AllReduce kernel.
 * Prints one JSON line: the wall ns per timed call (what the calling thread pays) and, with
 * the agent, the ring's counters after disabling (which flushes CUPTI): records + dropped +
 * cupti_dropped = every op enabled.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "../standins/sim_cuda.h"
#include "../standins/sim_nccl.h"
#include "argus_gpu_ring.h"

cudaError_t cudaMemsetAsync(void *devPtr, int value, size_t count, cudaStream_t stream);

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

__attribute__((noinline)) void bench_kernel(void) { __asm__ volatile(""); }

static struct argus_gpu_hdr *open_hdr(void)
{
    char path[64];
    snprintf(path, sizeof path, "/dev/shm/argus-gpu-%d", (int)getpid());
    int fd = open(path, O_RDWR);
    if (fd < 0)
        return NULL;
    void *p = mmap(NULL, ARGUS_GPU_HDR_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return p == MAP_FAILED ? NULL : p;
}

static int wait_active(struct argus_gpu_hdr *h, uint32_t want)
{
    for (int i = 0; i < 5000; i++) {
        if (__atomic_load_n(&h->active, __ATOMIC_ACQUIRE) == want)
            return 1;
        usleep(1000);
    }
    return 0;
}

static void set_enabled(struct argus_gpu_hdr *h, uint32_t v)
{
    __atomic_store_n(&h->enabled, v, __ATOMIC_RELEASE);
    syscall(SYS_futex, &h->enabled, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s none|dormant|enabled N [agent.so [launch|coll]]\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1];
    long n = atol(argv[2]);
    int agent = strcmp(mode, "none") != 0;
    int coll = argc > 4 && strcmp(argv[4], "coll") == 0;
    if (argc > 4 && !coll && strcmp(argv[4], "launch") != 0) {
        fprintf(stderr, "%s: what to measure is launch or coll, not %s\n", argv[0], argv[4]);
        return 2;
    }
    if (agent) {
        if (argc < 4) {
            fprintf(stderr, "%s: mode %s needs the agent's path\n", argv[0], mode);
            return 2;
        }
        setenv("CUDA_INJECTION64_PATH", argv[3], 1);
        if (coll)
            setenv("NCCL_PROFILER_PLUGIN", argv[3], 1);
        else
            unsetenv("NCCL_PROFILER_PLUGIN");
    } else {
        unsetenv("CUDA_INJECTION64_PATH");
        unsetenv("NCCL_PROFILER_PLUGIN");
    }
    cudaStream_t s;
    if (cudaStreamCreate(&s) != cudaSuccess) /* the first CUDA call loads the agent */
        return 1;
    ncclComm_t comm = NULL;
    if (coll) { /* a one-rank communicator: NCCL calls the plugin's init */
        ncclUniqueId id;
        if (ncclGetUniqueId(&id) != ncclSuccess || ncclCommInitRank(&comm, 1, id, 0) != ncclSuccess) {
            fprintf(stderr, "%s: no communicator\n", argv[0]);
            return 1;
        }
    }
    struct argus_gpu_hdr *h = agent ? open_hdr() : NULL;
    if (agent && !h) {
        fprintf(stderr, "%s: the agent made no shared file\n", argv[0]);
        return 1;
    }
    if (h && strcmp(mode, "enabled") == 0) {
        uint32_t want = ARGUS_GPU_ACTIVE_CUPTI | (coll ? ARGUS_GPU_ACTIVE_NCCL : 0);
        set_enabled(h, 1);
        if (!wait_active(h, want)) {
            fprintf(stderr, "%s: the agent did not switch on (active %u, want %u)\n", argv[0],
                    h->active, want);
            return 1;
        }
    }
    uint64_t t0, t1;
    if (coll) {
        float *buf = (float *)0x1000;
        for (int i = 0; i < 1000; i++) /* warm-up */
            ncclAllReduce(buf, buf, 1, ncclFloat, ncclSum, comm, s);
        cudaStreamSynchronize(s);
        t0 = now_ns();
        for (long i = 0; i < n; i++)
            ncclAllReduce(buf, buf, 1, ncclFloat, ncclSum, comm, s);
        t1 = now_ns();
        cudaStreamSynchronize(s);
    } else {
        dim3 g = { 1, 1, 1 }, b = { 1, 1, 1 };
        void *args[] = { NULL };
        for (int i = 0; i < 1000; i++) /* warm-up */
            cudaLaunchKernel((const void *)bench_kernel, g, b, args, 0, s);
        cudaStreamSynchronize(s);
        t0 = now_ns();
        for (long i = 0; i < n; i++)
            cudaLaunchKernel((const void *)bench_kernel, g, b, args, 0, s);
        t1 = now_ns();
        for (long i = 0; i < n / 10; i++) {
            cudaMemsetAsync((void *)0x1000, 0, 4096, s);
            cudaMemcpyAsync((void *)0x1000, (void *)0x2000, 4096, cudaMemcpyDeviceToDevice, s);
        }
        cudaStreamSynchronize(s);
    }
    uint64_t written = 0, dropped = 0, cupti_dropped = 0;
    if (h) {
        if (h->enabled) {
            set_enabled(h, 0); /* switching off flushes CUPTI into the ring */
            wait_active(h, 0);
        }
        written = __atomic_load_n(&h->written, __ATOMIC_ACQUIRE);
        dropped = __atomic_load_n(&h->dropped, __ATOMIC_ACQUIRE);
        cupti_dropped = __atomic_load_n(&h->cupti_dropped, __ATOMIC_ACQUIRE);
    }
    if (comm)
        ncclCommDestroy(comm);
    printf("{\"mode\": \"%s\", \"what\": \"%s\", \"launches\": %ld, \"ns_per_launch\": %.1f, "
           "\"records\": %llu, \"dropped\": %llu, \"cupti_dropped\": %llu, \"capacity\": %u}\n",
           mode, coll ? "coll" : "launch", n, (double)(t1 - t0) / (double)n,
           (unsigned long long)written,
           (unsigned long long)dropped, (unsigned long long)cupti_dropped,
           h ? h->capacity : 0);
    return 0;
}
