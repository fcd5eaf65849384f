/* threadloom/cudactx.h: CUDA devices as threadloom sees them.
 *
 * libthreadloom links the CUDA runtime but never the driver library directly, so it loads and
 * works on machines without a driver or GPU: the calls below then fail with TL_ENODRIVER or
 * TL_ENODEV and tl_err_detail() names the CUDA error (e.g. "cudaErrorInsufficientDriver").
 * NCCL is loaded on first use with dlopen("libnccl.so.2"). A build with TL_WITH_CUDA=OFF
 * answers TL_ENOSYS to every CUDA call. */
#ifndef THREADLOOM_CUDACTX_H
#define THREADLOOM_CUDACTX_H

#include "threadloom/common.h"

TL_BEGIN_DECLS

typedef struct {
  int index;            /* CUDA device ordinal (after CUDA_VISIBLE_DEVICES) */
  char name[256];       /* "NVIDIA H100 80GB HBM3" */
  char pci_bus_id[32];  /* "0000:3b:00.0", lower case, comparable with tl_topo_gpu_t */
  size_t total_mem;     /* bytes of device memory */
  int cc_major;         /* compute capability */
  int cc_minor;
  int sm_count;         /* streaming multiprocessors */
} tl_gpu_info_t;

/* 1 when built with CUDA support (TL_WITH_CUDA), else 0. */
TL_EXTERN int tl_cuda_built(void);
/* CUDA runtime version as 1000*major+10*minor (13000 for 13.0). Errors: TL_ENOSYS. */
TL_EXTERN int tl_cuda_runtime_version(int* version);
/* Highest CUDA version the installed driver supports, same encoding. Errors: TL_ENOSYS,
 * TL_ENODRIVER (no driver installed: *version is set to 0). */
TL_EXTERN int tl_cuda_driver_version(int* version);
/* Number of visible CUDA devices. On failure *count is 0. Errors: TL_ENOSYS, TL_ENODRIVER,
 * TL_ENODEV (a driver but no device, or CUDA_VISIBLE_DEVICES hides them all), TL_ECUDA. */
TL_EXTERN int tl_cuda_device_count(int* count);
/* Properties of device `dev`. Errors: as tl_cuda_device_count, TL_ENODEV for a bad ordinal. */
TL_EXTERN int tl_cuda_device_info(int dev, tl_gpu_info_t* out);
/* NCCL's version as NCCL_VERSION_CODE (22805 for 2.28.5). Errors: TL_ENOLIB (libnccl.so.2 not
 * loadable; tl_err_detail() has dlerror's text), TL_ENCCL. */
TL_EXTERN int tl_nccl_version(int* version);

TL_END_DECLS

#endif /* THREADLOOM_CUDACTX_H */
