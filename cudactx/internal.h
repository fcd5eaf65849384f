/* cudactx/internal.h: the device backend table, and NCCL's.
 *
 * Every device call of this part goes through one table of function pointers, tl__dev_api_t,
 * with three implementations: `cudart` (the CUDA runtime, backend_cudart.c; driver entry points
 * through cudaGetDriverEntryPointByVersion, libcuda is never linked), `sim` (simulated devices in
 * this process, backend_sim.c) and `none` (a build without CUDA, backend_none.c). Everything
 * above the table (devices.c, stream.c, dalloc.c, staging.c) is the same code for all of them,
 * and tests inject faults through the same path a real device takes.
 *
 * The table speaks CUDA's language: entries return raw cudaError_t values as int (the sim uses
 * the same codes, plus a few of its own above TL__SIM_ERR_BASE), handles are void* (a backend's
 * own stream and event objects), ordinals are the backend's device numbers. tl__dev_error()
 * translates a code into a TL_E* code with the backend's name for it in the detail. */
#ifndef THREADLOOM_CUDACTX_INTERNAL_H
#define THREADLOOM_CUDACTX_INTERNAL_H

#include "core/internal.h"
#include "threadloom/cudactx.h"
#include "threadloom/device.h"

/* cudaError_t values this part interprets (from driver_types.h; stable across CUDA releases). */
enum {
  TL__CUDA_SUCCESS = 0,
  TL__CUDA_INVALID_VALUE = 1,
  TL__CUDA_MEMORY_ALLOCATION = 2,
  TL__CUDA_INSUFFICIENT_DRIVER = 35,
  TL__CUDA_CALL_REQUIRES_NEWER_DRIVER = 36,
  TL__CUDA_NO_DEVICE = 100,
  TL__CUDA_INVALID_DEVICE = 101,
  TL__CUDA_ECC_UNCORRECTABLE = 214,
  TL__CUDA_NOT_READY = 600,
  TL__CUDA_ILLEGAL_ADDRESS = 700,
  TL__CUDA_HOST_MEMORY_ALREADY_REGISTERED = 712,
  TL__CUDA_HOST_MEMORY_NOT_REGISTERED = 713,
  TL__CUDA_HARDWARE_STACK_ERROR = 714,
  TL__CUDA_ILLEGAL_INSTRUCTION = 715,
  TL__CUDA_MISALIGNED_ADDRESS = 716,
  TL__CUDA_INVALID_ADDRESS_SPACE = 717,
  TL__CUDA_INVALID_PC = 718,
  TL__CUDA_LAUNCH_FAILURE = 719,
  TL__CUDA_SYSTEM_DRIVER_MISMATCH = 803,
  TL__CUDA_NOT_BUILT = -1 /* the "none" backend: built without CUDA */
};

/* The sim backend's own codes (its error_name names them). */
enum {
  TL__SIM_ERR_BASE = 10000,
  TL__SIM_DEVICE_LOST = 10001,   /* the device was lost (injected) or hit an illegal address */
  TL__SIM_COPY_FAILED = 10002,   /* an injected copy failure: the stream reports it once */
  TL__SIM_NOT_CONFIGURED = 10003 /* no sim devices: THREADLOOM_DEVICES=sim:N was not given */
};

/* cudaMemcpyKind values (the public TL_COPY_* are the same numbers). */
enum { TL__COPY_H2D = 1, TL__COPY_D2H = 2, TL__COPY_D2D = 3 };

typedef struct tl__dev_api_s {
  const char* name;                           /* "cudart", "sim", "none", or a test's name */
  tl_device_kind_t kind;                      /* the devices it serves (TL_DEVICE_NONE: none) */
  // -- discovery and versions (NULL where a backend has none) --------------------------------
  int (*runtime_version)(int* version);       /* cudaRuntimeGetVersion */
  int (*driver_version)(int* version);        /* cudaDriverGetVersion */
  int (*device_count)(int* count);            /* cudaGetDeviceCount */
  int (*device_info)(int dev, tl_gpu_info_t* out); /* cudaGetDeviceProperties + bus id */
  const char* (*error_name)(int code);        /* cudaGetErrorName */
  const char* (*error_string)(int code);      /* cudaGetErrorString */
  int (*host_register)(void* p, size_t size); /* cudaHostRegister(p, size, Default): page-lock */
  int (*host_unregister)(void* p);            /* cudaHostUnregister(p) */
  int (*set_device)(int dev);                 /* cudaSetDevice(dev), for the calling thread */
  // -- contexts --------------------------------------------------------------------------------
  /* Retains the device's primary context (cuDevicePrimaryCtxRetain through a driver entry
   * point) and loads what the backend needs in it (the spin kernel); once per device, before
   * any call below on that device. */
  int (*device_open)(int dev);
  /* Bytes free and in total on the device (cudaMemGetInfo). */
  int (*mem_info)(int dev, size_t* free_bytes, size_t* total);
  /* The stream priorities the device offers, numerically: least (lowest priority, 0) and
   * greatest (e.g. -5); cudaDeviceGetStreamPriorityRange. */
  int (*priority_range)(int dev, int* least, int* greatest);
  // -- streams (non-blocking: no implicit sync with the legacy default stream) ----------------
  int (*stream_create)(int dev, int priority, void** out); /* cudaStreamCreateWithPriority */
  int (*stream_destroy)(void* s);             /* cudaStreamDestroy (after its work is done) */
  int (*stream_query)(void* s);               /* cudaStreamQuery: 0, NOT_READY or the error */
  int (*stream_synchronize)(void* s);         /* cudaStreamSynchronize */
  int (*stream_wait_event)(void* s, void* e); /* cudaStreamWaitEvent(s, e, 0) */
  void* (*stream_handle)(void* s);            /* the cudaStream_t (DLPack, NCCL, torch) */
  /* cudaStreamWaitEvent on a stream threadloom did not make: `raw` is a handle stream_handle
   * gave out, or another library's cudaStream_t (1: legacy default, 2: per-thread default). */
  int (*foreign_wait_event)(int dev, void* raw, void* e);
  /* cudaEventRecord on such a stream (the allocator's record of a DLPack consumer's use). */
  int (*foreign_event_record)(int dev, void* raw, void* e);
  /* cudaLaunchHostFunc: fn(arg) runs on a backend thread once the stream's earlier work is
   * done; it must not call the device API. */
  int (*launch_host_func)(void* s, void (*fn)(void* arg), void* arg);
  // -- events ----------------------------------------------------------------------------------
  int (*event_create)(int dev, int timing, void** out); /* cudaEventCreateWithFlags */
  int (*event_destroy)(void* e);              /* cudaEventDestroy (pending records finish) */
  int (*event_record)(void* e, void* s);      /* cudaEventRecord */
  int (*event_query)(void* e);                /* cudaEventQuery: 0, NOT_READY or the error */
  int (*event_synchronize)(void* e);          /* cudaEventSynchronize */
  int (*event_elapsed)(float* ms, void* start, void* end); /* cudaEventElapsedTime */
  // -- memory and work -------------------------------------------------------------------------
  int (*mem_alloc)(int dev, size_t size, void** out); /* cudaMalloc on dev */
  int (*mem_free)(int dev, void* p);          /* cudaFree on dev */
  /* cudaMemcpyAsync(dst, src, size, kind, s); kind TL__COPY_* */
  int (*memcpy_async)(void* dst, const void* src, size_t size, int kind, void* s);
  int (*memset_async)(void* p, int value, size_t size, void* s); /* cudaMemsetAsync */
  int (*kernel_async)(void* s, uint64_t ns);  /* a one-thread kernel that spins for ns */
  int (*last_error)(void);                    /* cudaGetLastError (clears a non-sticky one) */
  /* The calling thread's text about the error code the backend returned last on this thread
   * ("use after free of a 4096-byte block..."), or NULL/"" for none; appended to the detail. */
  const char* (*last_detail)(void);
} tl__dev_api_t;

/* The CUDA table in use: discovery (tl_cuda_*), NCCL's cudaSetDevice, and the cuda devices.
 * Thread-safe (an atomic load). */
const tl__dev_api_t* tl__cuda_api(void);
/* Replaces the CUDA table (tests); returns the previous one. NULL restores the built-in one. */
const tl__dev_api_t* tl__cuda_set_api(const tl__dev_api_t* api);
/* The built-in CUDA table: cudart when TL_WITH_CUDA, else the "none" table. */
extern const tl__dev_api_t tl__cuda_builtin;
/* The simulated devices (backend_sim.c). */
extern const tl__dev_api_t tl__sim_api;
/* Translates a CUDA-style code of `api` into a TL_E* code and records
 * "<call>: <name> (<code>): <text>" as the detail. 0 stays 0. */
int tl__dev_error(const tl__dev_api_t* api, const char* call, int code);
/* tl__dev_error with the CUDA table in use. */
int tl__cuda_error(const char* call, int code);
/* The table that page-locks arenas: the sim's when sim is the selected backend, else the CUDA
 * table (which fails with its own reason, e.g. cudaErrorInsufficientDriver, without a GPU). */
const tl__dev_api_t* tl__host_pin_api(void);

// ---------------------------------------------------------------------------------------------
// The sim backend's configuration (backend_sim.c; devices.c parses THREADLOOM_DEVICES into it)
// ---------------------------------------------------------------------------------------------

/* Parses "sim:N[,option=value...]" and configures the sim backend; once per process (a second
 * call with the same text is accepted). Errors: TL_EINVAL naming the bad option, TL_EBUSY. */
int tl__sim_configure(const char* spec);
/* 1 once tl__sim_configure succeeded. */
int tl__sim_configured(void);
/* The options as configured, for the backend's "why" line. */
const char* tl__sim_spec(void);
/* The public sim controls of device.h, by sim ordinal (devices.c checks the kind). */
int tl__sim_stats(int dev, int engine, tl_engine_stats_t* out);
int tl__sim_set(int dev, const char* options);
int tl__sim_inject(int dev, int fault, int count);
int tl__sim_recover(int dev);
/* The index of the opened sim device whose live (not freed) allocation holds [p, p+n), or -1. */
int tl__sim_owner_index(const void* p, size_t n);

// ---------------------------------------------------------------------------------------------
// The objects above the table (registry.c, stream.c, dalloc.c, staging.c)
// ---------------------------------------------------------------------------------------------

#include <pthread.h>
#include <stdatomic.h>

#define TL__MAX_DEVICES 64 /* per kind */

struct tl__spool_s;

struct tl_device_s {
  const tl__dev_api_t* api;  /* its backend table (for cuda: tl__cuda_api() when created) */
  tl_device_kind_t kind;     /* TL_DEVICE_CUDA or TL_DEVICE_SIM */
  int ordinal;               /* the backend's device number */
  char name[16];             /* "cuda:0", "sim:3" */
  tl_device_props_t props;   /* filled when opened, read-only afterwards */
  _Atomic int opened;        /* 1 once device_open and the props succeeded */
  pthread_mutex_t mu;        /* opening, and the lists below */
  struct tl_stream_s* free_streams; /* streams given back by exited threads (mu) */
  struct tl_event_s* free_events;   /* events given back by exited threads (mu) */
  struct tl_stream_s* all_streams;  /* every stream of the device, never removed (mu) */
};

struct tl_stream_s {
  tl_device_t* dev;          /* immutable */
  const tl__dev_api_t* api;  /* dev->api, for the hot path */
  void* h;                   /* the backend's stream */
  int priority;              /* as created (clamped) */
  struct tl_stream_s* next;  /* link in a thread's cache or the device's free list */
  struct tl_stream_s* all_next; /* link in dev->all_streams */
  _Atomic(struct tl__spool_s*) pool; /* the allocator's cache for this stream (dalloc.c) */
};

struct tl_event_s {
  tl_device_t* dev;          /* immutable */
  const tl__dev_api_t* api;
  void* h;                   /* the backend's event */
  int timing;                /* created with TL_EVENT_TIMING */
  struct tl_event_s* next;   /* link in a thread's cache or the device's free list */
};

/* Opens dev if needed (registry.c). 0 or a TL_E* code. */
int tl__device_open(tl_device_t* dev);
/* Translates a failed table call on dev's backend (shorthand for tl__dev_error). */
#define TL__DEV_ERR(dev, call, rc) tl__dev_error((dev)->api, (call), (rc))
/* The allocator's statistics of one stream's cache, added into *out (dalloc.c). */
void tl__spool_add_stats(struct tl__spool_s* p, tl_dmem_stats_t* out);
/* Test hooks of staging.c: a byte written over every slot when it is handed out (-1: off),
 * and a switch that hands slots back without waiting for their event (to show that the
 * staging test catches the race it guards against). */
extern _Atomic int tl__staging_poison_byte;
extern _Atomic int tl__staging_unsafe;

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
