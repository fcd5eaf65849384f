/* cudactx/backend_cudart.c: the device backend table over the real CUDA runtime
 * (TL_WITH_CUDA=ON).
 *
 * Only runtime API calls that work without a driver are made before a driver is known to be
 * present: cudaRuntimeGetVersion and cudaDriverGetVersion never need one, cudaGetDeviceCount
 * reports cudaErrorInsufficientDriver when libcuda.so.1 is absent.
 *
 * Driver API: libthreadloom never links libcuda. The few driver functions it needs (primary
 * context retain, current-context get/set, module load and kernel launch) come from
 * cudaGetDriverEntryPointByVersion (CUDA 13 deprecates the unversioned cudaGetDriverEntryPoint)
 * with the CUDA 12.0 ABI, once, when the first device is opened. cuda.h is included for its types
 * only. CUresult values are the cudaError_t numbers for every error the table reports (the
 * runtime's codes mirror the driver's), so they share error_name.
 *
 * Devices: opening one retains its primary context (the same one the runtime uses, shared by
 * every thread) and loads a one-function PTX module into it: tl_spin(ns), a one-thread kernel
 * that spins on %globaltimer, the "kernel that takes its declared time" of the table. Calls that
 * act on a device make its primary context current for the call and restore the thread's
 * previous context afterwards (cuCtxGetCurrent/cuCtxSetCurrent: thread-local, cheap), so
 * threadloom never changes which device torch or the user's code sees as current.
 *
 * Streams and events are wrapped with their device (a 16-byte record), which the calls above
 * need; the raw cudaStream_t is what stream_handle gives out. */
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cudactx/internal.h"

// ---------------------------------------------------------------------------------------------
// Driver entry points
// ---------------------------------------------------------------------------------------------

typedef CUresult (*tl__cuDeviceGet_t)(CUdevice*, int);
typedef CUresult (*tl__cuDevicePrimaryCtxRetain_t)(CUcontext*, CUdevice);
typedef CUresult (*tl__cuCtxGetCurrent_t)(CUcontext*);
typedef CUresult (*tl__cuCtxSetCurrent_t)(CUcontext);
typedef CUresult (*tl__cuModuleLoadData_t)(CUmodule*, const void*);
typedef CUresult (*tl__cuModuleGetFunction_t)(CUfunction*, CUmodule, const char*);
typedef CUresult (*tl__cuLaunchKernel_t)(CUfunction, unsigned, unsigned, unsigned, unsigned,
                                         unsigned, unsigned, unsigned, CUstream, void**, void**);

/* Written once under tl__drv_once, read-only afterwards. */
static pthread_once_t tl__drv_once = PTHREAD_ONCE_INIT;
static struct {
  int rc;                                    /* cudaSuccess, or why the lookup failed */
  char missing[64];                          /* the symbol that was not found */
  tl__cuDeviceGet_t device_get;              /* cuDeviceGet */
  tl__cuDevicePrimaryCtxRetain_t ctx_retain; /* cuDevicePrimaryCtxRetain */
  tl__cuCtxGetCurrent_t ctx_get;             /* cuCtxGetCurrent */
  tl__cuCtxSetCurrent_t ctx_set;             /* cuCtxSetCurrent */
  tl__cuModuleLoadData_t module_load;        /* cuModuleLoadData */
  tl__cuModuleGetFunction_t module_function; /* cuModuleGetFunction */
  tl__cuLaunchKernel_t launch;               /* cuLaunchKernel */
} tl__drv;

static void tl__drv_load(void) {
  static const struct {
    const char* name;
    size_t offset;
  } syms[] = {
      {"cuDeviceGet", offsetof(__typeof__(tl__drv), device_get)},
      {"cuDevicePrimaryCtxRetain", offsetof(__typeof__(tl__drv), ctx_retain)},
      {"cuCtxGetCurrent", offsetof(__typeof__(tl__drv), ctx_get)},
      {"cuCtxSetCurrent", offsetof(__typeof__(tl__drv), ctx_set)},
      {"cuModuleLoadData", offsetof(__typeof__(tl__drv), module_load)},
      {"cuModuleGetFunction", offsetof(__typeof__(tl__drv), module_function)},
      {"cuLaunchKernel", offsetof(__typeof__(tl__drv), launch)},
  };
  for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
    void* fp = NULL;
    enum cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSuccess;
    cudaError_t e = cudaGetDriverEntryPointByVersion(syms[i].name, &fp, 12000, cudaEnableDefault, &q);
    if (e != cudaSuccess || !fp || q != cudaDriverEntryPointSuccess) {
      tl__drv.rc = e != cudaSuccess ? (int)e : (int)cudaErrorSymbolNotFound;
      tl__strlcpy(tl__drv.missing, syms[i].name, sizeof tl__drv.missing);
      return;
    }
    memcpy((char*)&tl__drv + syms[i].offset, &fp, sizeof fp);
  }
}

static _Thread_local char tl__rt_detail[160];
/* Hands the text over once: a later failure without a text of its own never shows it. */
static const char* tl__rt_last_detail(void) {
  static _Thread_local char taken[sizeof tl__rt_detail];
  memcpy(taken, tl__rt_detail, sizeof taken);
  tl__rt_detail[0] = '\0';
  return taken;
}

/* Records which call failed (the table's caller names the table entry) and returns rc. */
static int tl__rt_fail(int rc, const char* what) {
  if (rc) tl__strlcpy(tl__rt_detail, what, sizeof tl__rt_detail);
  return rc;
}

// ---------------------------------------------------------------------------------------------
// Devices and their primary contexts
// ---------------------------------------------------------------------------------------------

/* The spin kernel (PTX ISA 7.0, sm_75 and later: the driver JIT-compiles it for the GPU). */
static const char tl__spin_ptx[] =
    ".version 7.0\n"
    ".target sm_75\n"
    ".address_size 64\n"
    ".visible .entry tl_spin(.param .u64 tl_spin_ns)\n"
    "{\n"
    "  .reg .pred %p<2>;\n"
    "  .reg .b64 %rd<5>;\n"
    "  ld.param.u64 %rd1, [tl_spin_ns];\n"
    "  setp.eq.u64 %p1, %rd1, 0;\n"
    "  @%p1 bra DONE;\n"
    "  mov.u64 %rd2, %globaltimer;\n"
    "  add.u64 %rd3, %rd2, %rd1;\n"
    "LOOP:\n"
    "  mov.u64 %rd4, %globaltimer;\n"
    "  setp.lt.u64 %p1, %rd4, %rd3;\n"
    "  @%p1 bra LOOP;\n"
    "DONE:\n"
    "  ret;\n"
    "}\n";

#define TL__RT_MAX 64
/* Per device: written once by device_open (under tl__rt_mu), read-only afterwards. */
static pthread_mutex_t tl__rt_mu = PTHREAD_MUTEX_INITIALIZER;
static struct {
  CUcontext ctx;    /* the retained primary context */
  CUfunction spin;  /* tl_spin in it */
  int open;
} tl__rt_dev[TL__RT_MAX];

static int tl__rt_device_open(int dev) {
  if (dev < 0 || dev >= TL__RT_MAX) return tl__rt_fail((int)cudaErrorInvalidDevice, "device");
  pthread_once(&tl__drv_once, tl__drv_load);
  if (tl__drv.rc) {
    snprintf(tl__rt_detail, sizeof tl__rt_detail, "cudaGetDriverEntryPointByVersion(\"%s\", "
             "12000) found no driver function", tl__drv.missing);
    return tl__drv.rc;
  }
  pthread_mutex_lock(&tl__rt_mu);
  int rc = 0;
  if (!tl__rt_dev[dev].open) {
    CUdevice d;
    CUcontext ctx = NULL, prev = NULL;
    CUmodule mod;
    CUfunction fn;
    if ((rc = tl__rt_fail((int)tl__drv.device_get(&d, dev), "cuDeviceGet")) == 0 &&
        (rc = tl__rt_fail((int)tl__drv.ctx_retain(&ctx, d), "cuDevicePrimaryCtxRetain")) == 0 &&
        (rc = tl__rt_fail((int)tl__drv.ctx_get(&prev), "cuCtxGetCurrent")) == 0 &&
        (rc = tl__rt_fail((int)tl__drv.ctx_set(ctx), "cuCtxSetCurrent")) == 0) {
      if ((rc = tl__rt_fail((int)tl__drv.module_load(&mod, tl__spin_ptx),
                            "cuModuleLoadData (the spin kernel's PTX)")) == 0 &&
          (rc = tl__rt_fail((int)tl__drv.module_function(&fn, mod, "tl_spin"),
                            "cuModuleGetFunction")) == 0) {
        tl__rt_dev[dev].ctx = ctx;
        tl__rt_dev[dev].spin = fn;
        tl__rt_dev[dev].open = 1;
      }
      tl__drv.ctx_set(prev);
    }
  }
  pthread_mutex_unlock(&tl__rt_mu);
  return rc;
}

/* Makes dev's primary context current for a call; *prev is the thread's context to restore. */
static int tl__rt_enter(int dev, CUcontext* prev) {
  *prev = NULL;
  CUresult r = tl__drv.ctx_get(prev);
  if (r == CUDA_SUCCESS && *prev != tl__rt_dev[dev].ctx) r = tl__drv.ctx_set(tl__rt_dev[dev].ctx);
  return tl__rt_fail((int)r, "cuCtxSetCurrent");
}

static void tl__rt_leave(int dev, CUcontext prev) {
  if (prev != tl__rt_dev[dev].ctx) tl__drv.ctx_set(prev);
}

/* Runs `call` (an expression yielding cudaError_t) with dev's context current. */
#define TL__RT_ON(dev, what, call)                  \
  do {                                              \
    CUcontext prev_;                                \
    int rc_ = tl__rt_enter((dev), &prev_);          \
    if (rc_ == 0) {                                 \
      rc_ = tl__rt_fail((int)(call), (what));       \
      tl__rt_leave((dev), prev_);                   \
    }                                               \
    return rc_;                                     \
  } while (0)

// ---------------------------------------------------------------------------------------------
// Discovery (no device needed)
// ---------------------------------------------------------------------------------------------

static int tl__rt_runtime_version(int* v) { return (int)cudaRuntimeGetVersion(v); }
static int tl__rt_driver_version(int* v) { return (int)cudaDriverGetVersion(v); }
static int tl__rt_device_count(int* n) { return (int)cudaGetDeviceCount(n); }

static int tl__rt_device_info(int dev, tl_gpu_info_t* out) {
  struct cudaDeviceProp p;
  cudaError_t e = cudaGetDeviceProperties(&p, dev);
  if (e != cudaSuccess) return (int)e;
  memset(out, 0, sizeof *out);
  out->index = dev;
  tl__strlcpy(out->name, p.name, sizeof out->name);
  snprintf(out->pci_bus_id, sizeof out->pci_bus_id, "%04x:%02x:%02x.0", (unsigned)p.pciDomainID,
           (unsigned)p.pciBusID, (unsigned)p.pciDeviceID);
  out->total_mem = p.totalGlobalMem;
  out->cc_major = p.major;
  out->cc_minor = p.minor;
  out->sm_count = p.multiProcessorCount;
  return 0;
}

/* Portable: pinned for every device's context, as staging for 8 GPUs needs. */
static int tl__rt_host_register(void* p, size_t size) {
  return (int)cudaHostRegister(p, size, cudaHostRegisterPortable);
}
static int tl__rt_host_unregister(void* p) { return (int)cudaHostUnregister(p); }
static int tl__rt_set_device(int dev) { return (int)cudaSetDevice(dev); }

static const char* tl__rt_error_name(int code) { return cudaGetErrorName((cudaError_t)code); }
static const char* tl__rt_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

// ---------------------------------------------------------------------------------------------
// Devices, streams, events, memory, work
// ---------------------------------------------------------------------------------------------

typedef struct {
  cudaStream_t s;
  int dev;
} tl__rt_stream_t;

typedef struct {
  cudaEvent_t e;
  int dev;
} tl__rt_event_t;

static int tl__rt_mem_info(int dev, size_t* free_bytes, size_t* total) {
  TL__RT_ON(dev, "cudaMemGetInfo", cudaMemGetInfo(free_bytes, total));
}

static int tl__rt_priority_range(int dev, int* least, int* greatest) {
  TL__RT_ON(dev, "cudaDeviceGetStreamPriorityRange",
            cudaDeviceGetStreamPriorityRange(least, greatest));
}

static int tl__rt_stream_create(int dev, int priority, void** out) {
  tl__rt_stream_t* s = malloc(sizeof *s);
  if (!s) return (int)cudaErrorMemoryAllocation;
  s->dev = dev;
  CUcontext prev;
  int rc = tl__rt_enter(dev, &prev);
  if (rc == 0) {
    rc = tl__rt_fail((int)cudaStreamCreateWithPriority(&s->s, cudaStreamNonBlocking, priority),
                     "cudaStreamCreateWithPriority");
    tl__rt_leave(dev, prev);
  }
  if (rc) free(s);
  else *out = s;
  return rc;
}

static int tl__rt_stream_destroy(void* sp) {
  tl__rt_stream_t* s = sp;
  int rc = (int)cudaStreamDestroy(s->s);
  free(s);
  return rc;
}

static int tl__rt_stream_query(void* s) { return (int)cudaStreamQuery(((tl__rt_stream_t*)s)->s); }
static int tl__rt_stream_synchronize(void* s) {
  return (int)cudaStreamSynchronize(((tl__rt_stream_t*)s)->s);
}
static int tl__rt_stream_wait_event(void* s, void* e) {
  return (int)cudaStreamWaitEvent(((tl__rt_stream_t*)s)->s, ((tl__rt_event_t*)e)->e, 0);
}
static void* tl__rt_stream_handle(void* s) { return (void*)((tl__rt_stream_t*)s)->s; }

static int tl__rt_foreign_wait_event(int dev, void* raw, void* e) {
  TL__RT_ON(dev, "cudaStreamWaitEvent",
            cudaStreamWaitEvent((cudaStream_t)raw, ((tl__rt_event_t*)e)->e, 0));
}

static int tl__rt_foreign_event_record(int dev, void* raw, void* e) {
  TL__RT_ON(dev, "cudaEventRecord", cudaEventRecord(((tl__rt_event_t*)e)->e, (cudaStream_t)raw));
}

static int tl__rt_launch_host_func(void* sp, void (*fn)(void*), void* arg) {
  tl__rt_stream_t* s = sp;
  TL__RT_ON(s->dev, "cudaLaunchHostFunc", cudaLaunchHostFunc(s->s, fn, arg));
}

static int tl__rt_event_create(int dev, int timing, void** out) {
  tl__rt_event_t* e = malloc(sizeof *e);
  if (!e) return (int)cudaErrorMemoryAllocation;
  e->dev = dev;
  CUcontext prev;
  int rc = tl__rt_enter(dev, &prev);
  if (rc == 0) {
    rc = tl__rt_fail((int)cudaEventCreateWithFlags(&e->e, timing ? cudaEventDefault
                                                                 : cudaEventDisableTiming),
                     "cudaEventCreateWithFlags");
    tl__rt_leave(dev, prev);
  }
  if (rc) free(e);
  else *out = e;
  return rc;
}

static int tl__rt_event_destroy(void* ep) {
  tl__rt_event_t* e = ep;
  int rc = (int)cudaEventDestroy(e->e);
  free(e);
  return rc;
}

static int tl__rt_event_record(void* ep, void* sp) {
  tl__rt_event_t* e = ep;
  tl__rt_stream_t* s = sp;
  TL__RT_ON(s->dev, "cudaEventRecord", cudaEventRecord(e->e, s->s));
}
static int tl__rt_event_query(void* e) { return (int)cudaEventQuery(((tl__rt_event_t*)e)->e); }
static int tl__rt_event_synchronize(void* e) {
  return (int)cudaEventSynchronize(((tl__rt_event_t*)e)->e);
}
static int tl__rt_event_elapsed(float* ms, void* a, void* b) {
  return (int)cudaEventElapsedTime(ms, ((tl__rt_event_t*)a)->e, ((tl__rt_event_t*)b)->e);
}

static int tl__rt_mem_alloc(int dev, size_t size, void** out) {
  TL__RT_ON(dev, "cudaMalloc", cudaMalloc(out, size));
}
static int tl__rt_mem_free(int dev, void* p) { TL__RT_ON(dev, "cudaFree", cudaFree(p)); }

static int tl__rt_memcpy_async(void* dst, const void* src, size_t size, int kind, void* sp) {
  tl__rt_stream_t* s = sp;
  TL__RT_ON(s->dev, "cudaMemcpyAsync",
            cudaMemcpyAsync(dst, src, size, (enum cudaMemcpyKind)kind, s->s));
}

static int tl__rt_memset_async(void* p, int value, size_t size, void* sp) {
  tl__rt_stream_t* s = sp;
  TL__RT_ON(s->dev, "cudaMemsetAsync", cudaMemsetAsync(p, value, size, s->s));
}

static int tl__rt_kernel_async(void* sp, uint64_t ns) {
  tl__rt_stream_t* s = sp;
  unsigned long long arg = ns;
  void* params[] = {&arg};
  TL__RT_ON(s->dev, "cuLaunchKernel (tl_spin)",
            tl__drv.launch(tl__rt_dev[s->dev].spin, 1, 1, 1, 1, 1, 1, 0, (CUstream)s->s, params,
                           NULL));
}

static int tl__rt_last_error(void) { return (int)cudaGetLastError(); }

const tl__dev_api_t tl__cuda_builtin = {
    .name = "cudart",
    .kind = TL_DEVICE_CUDA,
    .runtime_version = tl__rt_runtime_version,
    .driver_version = tl__rt_driver_version,
    .device_count = tl__rt_device_count,
    .device_info = tl__rt_device_info,
    .error_name = tl__rt_error_name,
    .error_string = tl__rt_error_string,
    .host_register = tl__rt_host_register,
    .host_unregister = tl__rt_host_unregister,
    .set_device = tl__rt_set_device,
    .device_open = tl__rt_device_open,
    .mem_info = tl__rt_mem_info,
    .priority_range = tl__rt_priority_range,
    .stream_create = tl__rt_stream_create,
    .stream_destroy = tl__rt_stream_destroy,
    .stream_query = tl__rt_stream_query,
    .stream_synchronize = tl__rt_stream_synchronize,
    .stream_wait_event = tl__rt_stream_wait_event,
    .stream_handle = tl__rt_stream_handle,
    .foreign_wait_event = tl__rt_foreign_wait_event,
    .foreign_event_record = tl__rt_foreign_event_record,
    .launch_host_func = tl__rt_launch_host_func,
    .event_create = tl__rt_event_create,
    .event_destroy = tl__rt_event_destroy,
    .event_record = tl__rt_event_record,
    .event_query = tl__rt_event_query,
    .event_synchronize = tl__rt_event_synchronize,
    .event_elapsed = tl__rt_event_elapsed,
    .mem_alloc = tl__rt_mem_alloc,
    .mem_free = tl__rt_mem_free,
    .memcpy_async = tl__rt_memcpy_async,
    .memset_async = tl__rt_memset_async,
    .kernel_async = tl__rt_kernel_async,
    .last_error = tl__rt_last_error,
    .last_detail = tl__rt_last_detail,
};
