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
 * to the communicator of `id`. The communicator is non-blocking (ncclCommInitRankConfig with
 * blocking=0): this call polls ncclCommGetAsyncError until every rank has joined, and when that
 * takes longer than `timeout_ms` (negative: no limit) it aborts the half-made communicator
 * (ncclCommAbort) and fails with TL_ETIMEDOUT, so a rank that never arrives cannot hang the
 * others forever. The same timeout bounds every later wait for ncclInProgress on it. On success
 * *out is a communicator the caller closes with tl_nccl_comm_close. Errors: TL_EINVAL (NULL,
 * rank outside [0, nranks)), TL_ENOLIB, TL_ENOSYS (built without CUDA), TL_ENODRIVER,
 * TL_ENODEV, TL_ECUDA (cudaSetDevice), TL_ETIMEDOUT, TL_ENCCL. */
TL_EXTERN int tl_nccl_comm_init(tl_nccl_comm_t** out, const tl_nccl_id_t* id, int nranks,
                                int rank, int device, int timeout_ms);
/* Aborts the communicator (ncclCommAbort): its pending and future calls, in any thread, fail
 * with TL_ECANCELED, and NCCL releases its resources. Thread-safety: thread-safe on one object,
 * also while another thread is inside a call on `comm` (invariants in cudactx/nccl.c), but not
 * concurrently with tl_nccl_comm_close. 0 when aborted now or before; TL_ENCCL. */
TL_EXTERN int tl_nccl_comm_abort(tl_nccl_comm_t* comm);
/* Destroys the communicator (ncclCommDestroy, or nothing more after an abort) and frees it.
 * NULL is a no-op. No other call on comm may run or follow. Returns 0 or TL_ENCCL (comm is freed
 * either way). */
TL_EXTERN int tl_nccl_comm_close(tl_nccl_comm_t* comm);
/* 1 once tl_nccl_comm_abort ran on comm (by the caller, or after an asynchronous NCCL error or a
 * timeout), else 0. Thread-safe on one object. */
TL_EXTERN int tl_nccl_comm_aborted(const tl_nccl_comm_t* comm);
/* Asks NCCL for the communicator's asynchronous error (ncclCommGetAsyncError): 0 while healthy
 * (or still working); on an error (a peer died, a network failure) the communicator is aborted
 * and TL_ENCCL names NCCL's error. For a watchdog thread; thread-safe on one object. Errors:
 * TL_EINVAL (NULL), TL_ECANCELED (aborted before), TL_ENCCL. */
TL_EXTERN int tl_nccl_comm_check(tl_nccl_comm_t* comm);

// ---------------------------------------------------------------------------------------------
// Collectives. Element types are DLPack's (DLDataType: code, bits, lanes), as tensors from
// torch/cupy/JAX describe themselves; NCCL takes int8/uint8/int32/uint32/int64/uint64,
// float16/32/64 and bfloat16, lanes 1. Buffers are device pointers (or anything NCCL accepts)
// of `count` elements; NCCL reads and writes them asynchronously on `stream` (a cudaStream_t;
// NULL is the legacy default stream), so they must stay allocated until that work is done: the
// calls return once the work is enqueued, not finished. Every call fails cleanly (TL_ECANCELED)
// on an aborted communicator, never touching the freed NCCL one, also when another thread
// aborts it meanwhile; an asynchronous NCCL error found while waiting aborts the communicator
// (TL_ENCCL), as does a wait longer than the communicator's timeout (TL_ETIMEDOUT). Errors of
// every collective: TL_EINVAL (NULL comm or buffer with count > 0, an element type NCCL lacks,
// op avg on an integer type, a size that overflows), TL_ECANCELED, TL_ETIMEDOUT, TL_ENCCL.
// ---------------------------------------------------------------------------------------------

/* DLPack's DLDataTypeCode values the collectives accept, and its DLDataType layout. */
enum { TL_DTYPE_INT = 0, TL_DTYPE_UINT = 1, TL_DTYPE_FLOAT = 2, TL_DTYPE_BFLOAT = 4 };
typedef struct {
  uint8_t code;   /* TL_DTYPE_* (DLDataTypeCode) */
  uint8_t bits;   /* bits per element: 8, 16, 32, 64 */
  uint16_t lanes; /* 1 */
} tl_dtype_t;

/* Reductions. avg divides the sum by the number of ranks (ncclAvg); float types only. */
typedef enum { TL_NCCL_SUM, TL_NCCL_PROD, TL_NCCL_MAX, TL_NCCL_MIN, TL_NCCL_AVG } tl_nccl_op_t;

/* Bytes per element of `dtype` as NCCL sees it, or TL_EINVAL (the detail says which types NCCL
 * takes). */
TL_EXTERN int tl_nccl_dtype_size(tl_dtype_t dtype, size_t* size);
/* recv[i] = op over ranks of send[i], i < count (ncclAllReduce). send == recv: in place. */
TL_EXTERN int tl_nccl_allreduce(tl_nccl_comm_t* comm, const void* send, void* recv, size_t count,
                                tl_dtype_t dtype, tl_nccl_op_t op, void* stream);
/* recv = root's send, count elements (ncclBroadcast; send is read in root only). Also TL_EINVAL
 * for a root outside the world. */
TL_EXTERN int tl_nccl_broadcast(tl_nccl_comm_t* comm, const void* send, void* recv, size_t count,
                                tl_dtype_t dtype, int root, void* stream);
/* recv (nranks * sendcount elements) = every rank's send in rank order (ncclAllGather). */
TL_EXTERN int tl_nccl_allgather(tl_nccl_comm_t* comm, const void* send, void* recv,
                                size_t sendcount, tl_dtype_t dtype, void* stream);
/* recv (recvcount elements) = chunk `rank` of the reduction of send (nranks * recvcount elements)
 * (ncclReduceScatter). */
TL_EXTERN int tl_nccl_reduce_scatter(tl_nccl_comm_t* comm, const void* send, void* recv,
                                     size_t recvcount, tl_dtype_t dtype, tl_nccl_op_t op,
                                     void* stream);
/* Groups the calling thread's collectives (ncclGroupStart/End) so NCCL launches them together;
 * groups nest, and the outermost end launches and then waits for every communicator used in the
 * group to leave ncclInProgress. Per thread, as NCCL's groups are. An abort of a communicator
 * with collectives queued in an open group takes effect at the group's end (NCCL still holds
 * the communicator until then). Errors: TL_EINVAL (end without start, more than
 * TL_NCCL_GROUP_MAX communicators in one group), TL_ENOLIB, TL_ECANCELED, TL_ETIMEDOUT,
 * TL_ENCCL. */
#define TL_NCCL_GROUP_MAX 32
TL_EXTERN int tl_nccl_group_start(void);
TL_EXTERN int tl_nccl_group_end(void);

TL_END_DECLS

#endif /* THREADLOOM_CUDACTX_H */
