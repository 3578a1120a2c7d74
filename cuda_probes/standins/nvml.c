/*
 * nvml.c - stand-in libnvidia-ml.so.1 for pynvml (nvidia-ml-py). It is loaded by the
 * tracer, not by the ranks: every getter reads the device state file that the rank
 * owning the device publishes (/dev/shm/argus-sim-<ARGUS_SIM_NODE>-gpu<i>, see simgpu.h).
 * Devices: max(ARGUS_SIM_GPUS (default 8), highest published index + 1). A device with no
 * live owner reports an idle GPU (idle clock 345 MHz, GpuIdle reason, 0 % busy).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "simgpu.h"

typedef int nvmlReturn_t;
enum { NVML_SUCCESS = 0, NVML_ERROR_UNINITIALIZED = 1, NVML_ERROR_INVALID_ARGUMENT = 2,
       NVML_ERROR_NOT_SUPPORTED = 3, NVML_ERROR_INSUFFICIENT_SIZE = 7,
       NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25 };
typedef struct nvmlDevice_st *nvmlDevice_t;
typedef enum { NVML_CLOCK_GRAPHICS = 0, NVML_CLOCK_SM = 1, NVML_CLOCK_MEM = 2,
               NVML_CLOCK_VIDEO = 3 } nvmlClockType_t;
typedef int nvmlTemperatureSensors_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; }
    nvmlMemory_v2_t;
typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;
typedef struct { unsigned int version; nvmlTemperatureSensors_t sensorType; int temperature; }
    nvmlTemperature_t;

#define NVML_SYMBOLS(X) \
    X(nvmlInit) X(nvmlInit_v2) X(nvmlInitWithFlags) X(nvmlShutdown) X(nvmlErrorString) \
    X(nvmlSystemGetDriverVersion) X(nvmlSystemGetNVMLVersion) X(nvmlSystemGetCudaDriverVersion) \
    X(nvmlSystemGetCudaDriverVersion_v2) X(nvmlDeviceGetCount) X(nvmlDeviceGetCount_v2) \
    X(nvmlDeviceGetHandleByIndex) X(nvmlDeviceGetHandleByIndex_v2) X(nvmlDeviceGetIndex) \
    X(nvmlDeviceGetName) X(nvmlDeviceGetUUID) X(nvmlDeviceGetPciInfo) X(nvmlDeviceGetPciInfo_v2) \
    X(nvmlDeviceGetPciInfo_v3) X(nvmlDeviceGetUtilizationRates) X(nvmlDeviceGetClockInfo) \
    X(nvmlDeviceGetMaxClockInfo) X(nvmlDeviceGetPowerUsage) X(nvmlDeviceGetEnforcedPowerLimit) \
    X(nvmlDeviceGetTemperature) X(nvmlDeviceGetTemperatureV) \
    X(nvmlDeviceGetCurrentClocksThrottleReasons) X(nvmlDeviceGetCurrentClocksEventReasons) \
    X(nvmlDeviceGetMemoryInfo) X(nvmlDeviceGetMemoryInfo_v2)

#define X_ENUM(n) C_##n,
enum { NVML_SYMBOLS(X_ENUM) C_COUNT };
static unsigned long long counts[C_COUNT];
#define COUNT(n) ARGUS_COUNT(counts, C_##n)

#define MAXDEV 64
struct nvmlDevice_st { int index; };
static struct nvmlDevice_st g_dev[MAXDEV];
static int g_init;

struct snap {
    int live;
    unsigned sm, max_sm, mem;
    unsigned long long reasons, mem_used;
    double util;
};

static const char *node(void)
{
    const char *n = getenv("ARGUS_SIM_NODE");
    return (n && *n) ? n : "node0";
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int read_state(int i, struct argus_dev_state *st)
{
    char path[256];
    snprintf(path, sizeof path, "/dev/shm/argus-sim-%s-gpu%d", node(), i);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return 0;
    ssize_t n = pread(fd, st, sizeof *st, 0);
    close(fd);
    if (n != (ssize_t)sizeof *st || st->magic != ARGUS_DEV_MAGIC || st->tgid <= 0)
        return 0;
    if (kill(st->tgid, 0) != 0 && errno == ESRCH)
        return 0;
    return 1;
}

static struct snap snapshot(int i)
{
    struct snap s = { 0, 345, ARGUS_SIM_MAX_SM_MHZ, ARGUS_SIM_MEM_MHZ, 0x1ULL, 0, 0.0 };
    struct argus_dev_state st;
    if (!read_state(i, &st))
        return s;
    s.live = 1;
    s.sm = st.sm_clock_mhz;
    s.max_sm = st.max_sm_clock_mhz;
    s.mem = st.mem_clock_mhz;
    s.mem_used = st.mem_used_bytes + (512ULL << 20);
    uint64_t cur = now_ns() / ARGUS_DEV_BUCKET_NS, busy = 0;
    for (int b = 0; b < ARGUS_DEV_BUCKETS; b++)
        if (st.bucket_idx[b] < cur && st.bucket_idx[b] + ARGUS_DEV_BUCKETS >= cur)
            busy += st.busy_ns[b];
    s.util = (double)busy / (ARGUS_DEV_BUCKETS * ARGUS_DEV_BUCKET_NS);
    if (s.util > 1.0)
        s.util = 1.0;
    s.reasons = st.throttle_reasons | (s.util < 0.01 ? 0x1ULL : 0);
    return s;
}

static int devcount(void)
{
    const char *e = getenv("ARGUS_SIM_GPUS");
    int n = e ? atoi(e) : 8;
    if (n <= 0)
        n = 8;
    struct argus_dev_state st;
    for (int i = n; i < MAXDEV; i++)
        if (read_state(i, &st))
            n = i + 1;
    return n > MAXDEV ? MAXDEV : n;
}

#define CHECK_INIT() do { if (!g_init) return NVML_ERROR_UNINITIALIZED; } while (0)
#define CHECK_DEV(d) do { CHECK_INIT(); if (!(d) || (d)->index < 0 || (d)->index >= MAXDEV) \
                              return NVML_ERROR_INVALID_ARGUMENT; } while (0)

static nvmlReturn_t do_init(void)
{
    for (int i = 0; i < MAXDEV; i++)
        g_dev[i].index = i;
    g_init++;
    return NVML_SUCCESS;
}

ARGUS_EXPORT nvmlReturn_t nvmlInit(void) { COUNT(nvmlInit); return do_init(); }
ARGUS_EXPORT nvmlReturn_t nvmlInit_v2(void) { COUNT(nvmlInit_v2); return do_init(); }
ARGUS_EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    COUNT(nvmlInitWithFlags);
    (void)flags;
    return do_init();
}

ARGUS_EXPORT nvmlReturn_t nvmlShutdown(void)
{
    COUNT(nvmlShutdown);
    CHECK_INIT();
    g_init--;
    return NVML_SUCCESS;
}

ARGUS_EXPORT const char *nvmlErrorString(nvmlReturn_t result)
{
    COUNT(nvmlErrorString);
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t copy_str(char *dst, unsigned int len, const char *s)
{
    if (!dst)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(s) + 1 > len)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, s, strlen(s) + 1);
    return NVML_SUCCESS;
}

ARGUS_EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    COUNT(nvmlSystemGetDriverVersion);
    CHECK_INIT();
    return copy_str(version, length, "550.54.15");
}

ARGUS_EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    COUNT(nvmlSystemGetNVMLVersion);
    return copy_str(version, length, "12.550.54.15");
}

ARGUS_EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v)
{
    COUNT(nvmlSystemGetCudaDriverVersion);
    if (!v) return NVML_ERROR_INVALID_ARGUMENT;
    *v = 12040;
    return NVML_SUCCESS;
}

ARGUS_EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v)
{
    COUNT(nvmlSystemGetCudaDriverVersion_v2);
    if (!v) return NVML_ERROR_INVALID_ARGUMENT;
    *v = 12040;
    return NVML_SUCCESS;
}

static nvmlReturn_t get_count(unsigned int *c)
{
    CHECK_INIT();
    if (!c)
        return NVML_ERROR_INVALID_ARGUMENT;
    *c = (unsigned)devcount();
    return NVML_SUCCESS;
}
ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *c) { COUNT(nvmlDeviceGetCount); return get_count(c); }
ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *c) { COUNT(nvmlDeviceGetCount_v2); return get_count(c); }

static nvmlReturn_t by_index(unsigned int i, nvmlDevice_t *d)
{
    CHECK_INIT();
    if (!d || i >= (unsigned)devcount())
        return NVML_ERROR_INVALID_ARGUMENT;
    *d = &g_dev[i];
    return NVML_SUCCESS;
}
ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int i, nvmlDevice_t *d)
{ COUNT(nvmlDeviceGetHandleByIndex); return by_index(i, d); }
ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *d)
{ COUNT(nvmlDeviceGetHandleByIndex_v2); return by_index(i, d); }

ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t d, unsigned int *index)
{
    COUNT(nvmlDeviceGetIndex);
    CHECK_DEV(d);
    if (!index) return NVML_ERROR_INVALID_ARGUMENT;
    *index = (unsigned)d->index;
    return NVML_SUCCESS;
}

ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int length)
{
    COUNT(nvmlDeviceGetName);
    CHECK_DEV(d);
    return copy_str(name, length, "NVIDIA H100 80GB HBM3 (argus sim)");
}

ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int length)
{
    COUNT(nvmlDeviceGetUUID);
    CHECK_DEV(d);
    unsigned long long h = 14695981039346656037ULL;
    for (const char *p = node(); *p; p++)
        h = (h ^ (unsigned char)*p) * 1099511628211ULL;
    char buf[96];
    snprintf(buf, sizeof buf, "GPU-a7905eed-%04x-%04x-%04x-%012llx",
             (unsigned)(h >> 48) & 0xffff, (unsigned)(h >> 32) & 0xffff, (unsigned)d->index,
             h & 0xffffffffffffULL);
    return copy_str(uuid, length, buf);
}

static nvmlReturn_t pci(nvmlDevice_t d, nvmlPciInfo_t *p)
{
    CHECK_DEV(d);
    if (!p) return NVML_ERROR_INVALID_ARGUMENT;
    memset(p, 0, sizeof *p);
    p->domain = 0;
    p->bus = 0x18 + (unsigned)d->index;
    p->device = 0;
    p->pciDeviceId = 0x233010DE;
    p->pciSubSystemId = 0x16C110DE;
    snprintf(p->busId, sizeof p->busId, "00000000:%02X:00.0", p->bus);
    snprintf(p->busIdLegacy, sizeof p->busIdLegacy, "0000:%02X:00.0", p->bus);
    return NVML_SUCCESS;
}
ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetPciInfo(nvmlDevice_t d, nvmlPciInfo_t *p)
{ COUNT(nvmlDeviceGetPciInfo); return pci(d, p); }
ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t d, nvmlPciInfo_t *p)
{ COUNT(nvmlDeviceGetPciInfo_v2); return pci(d, p); }
ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t d, nvmlPciInfo_t *p)
{ COUNT(nvmlDeviceGetPciInfo_v3); return pci(d, p); }

ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u)
{
    COUNT(nvmlDeviceGetUtilizationRates);
    CHECK_DEV(d);
    if (!u) return NVML_ERROR_INVALID_ARGUMENT;
    struct snap s = snapshot(d->index);
    u->gpu = (unsigned)(s.util * 100.0 + 0.5);
    u->memory = (unsigned)(s.util * 40.0 + 0.5);
    return NVML_SUCCESS;
}

ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t d, nvmlClockType_t type,
                                                 unsigned int *clock)
{
    COUNT(nvmlDeviceGetClockInfo);
    CHECK_DEV(d);
    if (!clock) return NVML_ERROR_INVALID_ARGUMENT;
    struct snap s = snapshot(d->index);
    switch (type) {
    case NVML_CLOCK_GRAPHICS:
    case NVML_CLOCK_SM: *clock = s.sm; break;
    case NVML_CLOCK_MEM: *clock = s.mem; break;
    case NVML_CLOCK_VIDEO: *clock = s.live ? 1755 : 765; break;
    default: return NVML_ERROR_INVALID_ARGUMENT;
    }
    return NVML_SUCCESS;
}

ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetMaxClockInfo(nvmlDevice_t d, nvmlClockType_t type,
                                                    unsigned int *clock)
{
    COUNT(nvmlDeviceGetMaxClockInfo);
    CHECK_DEV(d);
    if (!clock) return NVML_ERROR_INVALID_ARGUMENT;
    switch (type) {
    case NVML_CLOCK_GRAPHICS:
    case NVML_CLOCK_SM: *clock = ARGUS_SIM_MAX_SM_MHZ; break;
    case NVML_CLOCK_MEM: *clock = ARGUS_SIM_MEM_MHZ; break;
    case NVML_CLOCK_VIDEO: *clock = 1980; break;
    default: return NVML_ERROR_INVALID_ARGUMENT;
    }
    return NVML_SUCCESS;
}

ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned int *power)
{
    COUNT(nvmlDeviceGetPowerUsage);
    CHECK_DEV(d);
    if (!power) return NVML_ERROR_INVALID_ARGUMENT;
    struct snap s = snapshot(d->index);
    double w = 70.0 + (s.live ? 630.0 * s.util * ((double)s.sm / s.max_sm) : 0.0);
    *power = (unsigned)(w * 1000.0);
    return NVML_SUCCESS;
}

ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t d, unsigned int *limit)
{
    COUNT(nvmlDeviceGetEnforcedPowerLimit);
    CHECK_DEV(d);
    if (!limit) return NVML_ERROR_INVALID_ARGUMENT;
    *limit = 700000;
    return NVML_SUCCESS;
}

static int temp_of(int index)
{
    struct snap s = snapshot(index);
    return 32 + (int)(45.0 * s.util) + ((s.reasons & 0x60) ? 20 : 0);
}

ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, nvmlTemperatureSensors_t sensor,
                                                   unsigned int *temp)
{
    COUNT(nvmlDeviceGetTemperature);
    CHECK_DEV(d);
    if (!temp || sensor != 0) return NVML_ERROR_INVALID_ARGUMENT;
    *temp = (unsigned)temp_of(d->index);
    return NVML_SUCCESS;
}

ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetTemperatureV(nvmlDevice_t d, nvmlTemperature_t *t)
{
    COUNT(nvmlDeviceGetTemperatureV);
    CHECK_DEV(d);
    if (!t || t->sensorType != 0) return NVML_ERROR_INVALID_ARGUMENT;
    if (t->version != 0x100000C) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    t->temperature = temp_of(d->index);
    return NVML_SUCCESS;
}

static nvmlReturn_t reasons(nvmlDevice_t d, unsigned long long *r)
{
    CHECK_DEV(d);
    if (!r) return NVML_ERROR_INVALID_ARGUMENT;
    *r = snapshot(d->index).reasons;
    return NVML_SUCCESS;
}
ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t d,
                                                                    unsigned long long *r)
{ COUNT(nvmlDeviceGetCurrentClocksThrottleReasons); return reasons(d, r); }
ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t d,
                                                                 unsigned long long *r)
{ COUNT(nvmlDeviceGetCurrentClocksEventReasons); return reasons(d, r); }

ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m)
{
    COUNT(nvmlDeviceGetMemoryInfo);
    CHECK_DEV(d);
    if (!m) return NVML_ERROR_INVALID_ARGUMENT;
    struct snap s = snapshot(d->index);
    m->total = ARGUS_SIM_MEM_TOTAL;
    m->used = s.mem_used;
    m->free = m->total - m->used;
    return NVML_SUCCESS;
}

ARGUS_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m)
{
    COUNT(nvmlDeviceGetMemoryInfo_v2);
    CHECK_DEV(d);
    if (!m) return NVML_ERROR_INVALID_ARGUMENT;
    struct snap s = snapshot(d->index);
    m->total = ARGUS_SIM_MEM_TOTAL;
    m->reserved = 0;
    m->used = s.mem_used;
    m->free = m->total - m->used;
    return NVML_SUCCESS;
}
