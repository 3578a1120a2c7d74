/*
 * cuda_driver.c - stand-in libcuda.so.1: the driver API entry points that launch and
 * synchronise (as cuBLAS and Triton call them) over the engine's virtual GPU.
 * A CUfunction from cuModuleGetFunction names its kernel (argus_sim_cufunction_name).
 */
#include <stdlib.h>
#include <string.h>

#include "sim_cuda.h"
#include "simgpu.h"

#define CUDA_SYMBOLS(X) \
    X(cuInit) X(cuDriverGetVersion) X(cuDeviceGetCount) X(cuModuleLoadData) \
    X(cuModuleGetFunction) X(cuLaunchKernel) X(cuLaunchKernelEx) X(cuCtxSynchronize) \
    X(cuStreamSynchronize)

#define X_ENUM(n) C_##n,
#define X_NAME(n) #n,
enum { CUDA_SYMBOLS(X_ENUM) C_COUNT };
static const char *const names[] = { CUDA_SYMBOLS(X_NAME) };
static unsigned long long counts[C_COUNT];
#define COUNT(n) ARGUS_COUNT(counts, C_##n)

#define FUNC_MAGIC 0x46554e4353494d41ULL
struct CUfunc_st {
    unsigned long long magic;
    char name[256];
};
struct CUmod_st {
    unsigned long long magic;
};

static int g_inited;

__attribute__((constructor)) static void cuda_init(void)
{
    argus_sim_register_counters("libcuda.so.1", names, counts, C_COUNT);
}

ARGUS_EXPORT const char *argus_sim_cufunction_name(CUfunction f)
{
    ARGUS_FRAME();
    return (f && f->magic == FUNC_MAGIC) ? f->name : NULL;
}

ARGUS_EXPORT CUresult cuInit(unsigned int Flags)
{
    ARGUS_FRAME();
    COUNT(cuInit);
    if (Flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    g_inited = 1;
    return CUDA_SUCCESS;
}

ARGUS_EXPORT CUresult cuDriverGetVersion(int *driverVersion)
{
    ARGUS_FRAME();
    COUNT(cuDriverGetVersion);
    if (!driverVersion)
        return CUDA_ERROR_INVALID_VALUE;
    *driverVersion = 12040;
    return CUDA_SUCCESS;
}

ARGUS_EXPORT CUresult cuDeviceGetCount(int *count)
{
    ARGUS_FRAME();
    COUNT(cuDeviceGetCount);
    if (!g_inited)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!count)
        return CUDA_ERROR_INVALID_VALUE;
    *count = argus_sim_device_count();
    return CUDA_SUCCESS;
}

ARGUS_EXPORT CUresult cuModuleLoadData(CUmodule *module, const void *image)
{
    ARGUS_FRAME();
    COUNT(cuModuleLoadData);
    (void)image;
    if (!module)
        return CUDA_ERROR_INVALID_VALUE;
    *module = calloc(1, sizeof(struct CUmod_st));
    (*module)->magic = FUNC_MAGIC;
    return CUDA_SUCCESS;
}

ARGUS_EXPORT CUresult cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name)
{
    ARGUS_FRAME();
    COUNT(cuModuleGetFunction);
    if (!hfunc || !name || !hmod)
        return CUDA_ERROR_INVALID_VALUE;
    if (hmod->magic != FUNC_MAGIC)
        return CUDA_ERROR_INVALID_HANDLE;
    struct CUfunc_st *f = calloc(1, sizeof *f);
    f->magic = FUNC_MAGIC;
    strncpy(f->name, name, sizeof f->name - 1);
    *hfunc = f;
    return CUDA_SUCCESS;
}

static CUresult launch(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                       unsigned by, unsigned bz, CUstream s)
{
    if (!f || f->magic != FUNC_MAGIC)
        return CUDA_ERROR_INVALID_HANDLE;
    argus_sim_enqueue_kernel(argus_sim_stream_resolve((void *)s, 0),
                             (unsigned long long)gx * gy * gz * bx * by * bz);
    return CUDA_SUCCESS;
}

ARGUS_EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                     unsigned int gridDimZ, unsigned int blockDimX,
                                     unsigned int blockDimY, unsigned int blockDimZ,
                                     unsigned int sharedMemBytes, CUstream hStream,
                                     void **kernelParams, void **extra)
{
    ARGUS_FRAME();
    COUNT(cuLaunchKernel);
    (void)sharedMemBytes; (void)kernelParams; (void)extra;
    return launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, hStream);
}

ARGUS_EXPORT CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f,
                                       void **kernelParams, void **extra)
{
    ARGUS_FRAME();
    COUNT(cuLaunchKernelEx);
    (void)kernelParams; (void)extra;
    if (!config)
        return CUDA_ERROR_INVALID_VALUE;
    return launch(f, config->gridDimX, config->gridDimY, config->gridDimZ, config->blockDimX,
                  config->blockDimY, config->blockDimZ, config->hStream);
}

ARGUS_EXPORT CUresult cuCtxSynchronize(void)
{
    ARGUS_FRAME();
    COUNT(cuCtxSynchronize);
    argus_sim_device_sync();
    return CUDA_SUCCESS;
}

ARGUS_EXPORT CUresult cuStreamSynchronize(CUstream hStream)
{
    ARGUS_FRAME();
    COUNT(cuStreamSynchronize);
    argus_sim_stream_sync(argus_sim_stream_resolve((void *)hStream, 0));
    return CUDA_SUCCESS;
}
