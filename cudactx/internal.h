/* cudactx/internal.h: the CUDA backend table.
 *
 * Every CUDA runtime call of this part goes through one table of function pointers, so tests
 * inject faults (no driver, no device, a failing call) through the same path the real runtime
 * takes. The table returns raw cudaError_t values as int; cudactx/device.c translates them. */
#ifndef THREADLOOM_CUDACTX_INTERNAL_H
#define THREADLOOM_CUDACTX_INTERNAL_H

#include "core/internal.h"
#include "threadloom/cudactx.h"

/* cudaError_t values this part interprets (from driver_types.h; stable across CUDA releases). */
enum {
  TL__CUDA_SUCCESS = 0,
  TL__CUDA_INVALID_DEVICE = 101,
  TL__CUDA_NO_DEVICE = 100,
  TL__CUDA_INSUFFICIENT_DRIVER = 35,
  TL__CUDA_CALL_REQUIRES_NEWER_DRIVER = 36,
  TL__CUDA_SYSTEM_DRIVER_MISMATCH = 803,
  TL__CUDA_NOT_BUILT = -1 /* the "none" backend: built without CUDA */
};

typedef struct {
  const char* name;                           /* "cudart", "none", or a test's name */
  int (*runtime_version)(int* version);       /* cudaRuntimeGetVersion */
  int (*driver_version)(int* version);        /* cudaDriverGetVersion */
  int (*device_count)(int* count);            /* cudaGetDeviceCount */
  int (*device_info)(int dev, tl_gpu_info_t* out); /* cudaGetDeviceProperties + bus id */
  const char* (*error_name)(int code);        /* cudaGetErrorName */
  const char* (*error_string)(int code);      /* cudaGetErrorString */
  int (*host_register)(void* p, size_t size); /* cudaHostRegister(p, size, Default): page-lock */
  int (*host_unregister)(void* p);            /* cudaHostUnregister(p) */
  int (*set_device)(int dev);                 /* cudaSetDevice(dev), for the calling thread */
} tl__cuda_api_t;

/* The table in use. Thread-safe (an atomic load). */
const tl__cuda_api_t* tl__cuda_api(void);
/* Replaces the table (tests); returns the previous one. NULL restores the built-in one. */
const tl__cuda_api_t* tl__cuda_set_api(const tl__cuda_api_t* api);
/* The built-in table: cudart when TL_WITH_CUDA, else the "none" table. */
extern const tl__cuda_api_t tl__cuda_builtin;
/* Translates a cudaError_t into a TL_E* code and records "<call>: <name>: <text>" as detail. */
int tl__cuda_error(const char* call, int code);

// ---------------------------------------------------------------------------------------------
// The NCCL backend table
// ---------------------------------------------------------------------------------------------

/* ncclResult_t values this part interprets, and the table's own "library not loaded". */
enum {
  TL__NCCL_SUCCESS = 0,
  TL__NCCL_IN_PROGRESS = 7, /* ncclInProgress: a non-blocking communicator is still working */
  TL__NCCL_NOT_LOADED = -1  /* libnccl.so.2 could not be opened (see the table's why()) */
};

/* ncclUniqueId: 128 opaque bytes, passed by value to ncclCommInitRank. */
typedef struct {
  char internal[TL_NCCL_ID_BYTES];
} tl__nccl_id_t;

/* Every NCCL call of this part, as raw ncclResult_t values (int); ncclDataType_t and ncclRedOp_t
 * are passed as their int values (enums, int-sized in NCCL's ABI), ncclComm_t and cudaStream_t
 * as void*. The built-in table opens libnccl.so.2 on first use; tests swap in their own table to
 * record calls and inject failures. Communicators are always made non-blocking (blocking=0 in
 * the ncclConfig_t the built-in table builds), so no call on them blocks: each may return
 * ncclInProgress, and nccl.c then polls comm_get_async_error. */
typedef struct {
  const char* name;                               /* "dlopen", or a test's name */
  int (*get_version)(int* version);               /* ncclGetVersion */
  int (*get_unique_id)(tl__nccl_id_t* id);        /* ncclGetUniqueId */
  /* ncclCommInitRankConfig with a config whose only set field is `blocking` */
  int (*comm_init_rank_config)(void** comm, int nranks, tl__nccl_id_t id, int rank, int blocking);
  int (*comm_get_async_error)(void* comm, int* state); /* ncclCommGetAsyncError */
  int (*comm_abort)(void* comm);                  /* ncclCommAbort */
  int (*comm_destroy)(void* comm);                /* ncclCommDestroy */
  int (*all_reduce)(const void* send, void* recv, size_t count, int dtype, int op, void* comm,
                    void* stream);                /* ncclAllReduce */
  int (*broadcast)(const void* send, void* recv, size_t count, int dtype, int root, void* comm,
                   void* stream);                 /* ncclBroadcast */
  int (*all_gather)(const void* send, void* recv, size_t sendcount, int dtype, void* comm,
                    void* stream);                /* ncclAllGather */
  int (*reduce_scatter)(const void* send, void* recv, size_t recvcount, int dtype, int op,
                        void* comm, void* stream); /* ncclReduceScatter */
  int (*group_start)(void);                       /* ncclGroupStart (per calling thread) */
  int (*group_end)(void);                         /* ncclGroupEnd */
  const char* (*error_string)(int code);          /* ncclGetErrorString */
  const char* (*last_error)(void* comm);          /* ncclGetLastError: NCCL's last message */
  const char* (*why)(void);                       /* why the library is not loaded ("" if it is) */
} tl__nccl_api_t;

/* The table in use (an atomic load), and the swap for tests: returns the previous table; NULL
 * restores the built-in one. */
const tl__nccl_api_t* tl__nccl_api(void);
const tl__nccl_api_t* tl__nccl_set_api(const tl__nccl_api_t* api);
extern const tl__nccl_api_t tl__nccl_builtin;

#endif /* THREADLOOM_CUDACTX_INTERNAL_H */
