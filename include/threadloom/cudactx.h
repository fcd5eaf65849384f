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

// ---------------------------------------------------------------------------------------------
// NCCL communicators. One tl_nccl_comm_t per GPU thread (rank); the unique id is made once per
// job (node 0) and handed to every rank out of band (threadloom.cluster's store).
// ---------------------------------------------------------------------------------------------

#define TL_NCCL_ID_BYTES 128 /* sizeof(ncclUniqueId) */

typedef struct {
  unsigned char bytes[TL_NCCL_ID_BYTES];
} tl_nccl_id_t;

typedef struct tl_nccl_comm_s tl_nccl_comm_t;

/* A new ncclUniqueId (ncclGetUniqueId: opens NCCL's bootstrap socket on this host; needs no
 * GPU). Errors: TL_EINVAL (NULL), TL_ENOLIB (libnccl.so.2 not loadable), TL_ENCCL (the
 * detail names the ncclResult_t). */
TL_EXTERN int tl_nccl_unique_id(tl_nccl_id_t* out);
/* Makes the calling thread's CUDA device `device`, then joins rank `rank` of an `nranks` world
 * to the communicator of `id` (ncclCommInitRank: blocks until every rank has joined). On
 * success *out is a communicator the caller closes with tl_nccl_comm_close. Errors: TL_EINVAL
 * (NULL, rank outside [0, nranks)), TL_ENOLIB, TL_ENOSYS (built without CUDA), TL_ENODRIVER,
 * TL_ENODEV, TL_ECUDA (cudaSetDevice), TL_ENCCL. */
TL_EXTERN int tl_nccl_comm_init(tl_nccl_comm_t** out, const tl_nccl_id_t* id, int nranks,
                                int rank, int device);
/* Aborts the communicator (ncclCommAbort): operations blocked on it, in any thread, return or
 * fail, and its resources are released. Thread-safety: may run while another thread is inside
 * an NCCL call on `comm` and concurrently with another abort (only the first aborts), not
 * concurrently with tl_nccl_comm_close. 0 when aborted now or before; TL_ENCCL. */
TL_EXTERN int tl_nccl_comm_abort(tl_nccl_comm_t* comm);
/* Destroys the communicator (ncclCommDestroy, or nothing more after an abort) and frees it.
 * NULL is a no-op. Returns 0 or TL_ENCCL (comm is freed either way). */
TL_EXTERN int tl_nccl_comm_close(tl_nccl_comm_t* comm);
/* 1 once tl_nccl_comm_abort ran on comm, else 0. */
TL_EXTERN int tl_nccl_comm_aborted(const tl_nccl_comm_t* comm);

TL_END_DECLS

#endif /* THREADLOOM_CUDACTX_H */
