/* threadloom/device.h: devices, streams, events, copies, device memory and pinned staging.
 *
 * One API over three backends: `cuda` (the CUDA runtime on real GPUs), `sim` (simulated
 * devices in this process: device memory is host memory with guard bytes, each device has a
 * compute engine and two copy engines that run queued work in stream order on their own
 * threads and take modelled time) and `none` (no devices). Everything here is the same code
 * for cuda and sim; only the backend table below it differs (cudactx/internal.h).
 *
 * Selection: THREADLOOM_DEVICES=sim:8 (options after the count: sim:8,h2d=25GB/s, see
 * tl_devices_select), =cuda or =none, or tl_devices_select() before first use. Default: cuda
 * when the CUDA runtime sees a driver and a GPU, else none; tl_devices_backend() says which
 * and why. The selected backend's devices are the default list (kind TL_DEVICE_DEFAULT); the
 * other kind stays reachable by name (tl_device_get(TL_DEVICE_SIM, 0, ...) once sim devices
 * are configured, tl_device_get(TL_DEVICE_CUDA, 0, ...) where a GPU is present), so one
 * process can hold both, e.g. tests that run on sim and on a GPU.
 *
 * Objects: a tl_device_t lives for the process (its primary context is retained once, on first
 * use, and shared by every thread). Streams come from per-thread, per-device pools
 * (tl_stream_acquire/release): no lock shared between threads on the submission path. Events,
 * device buffers (a caching allocator per device, stream-ordered) and staging pools (pinned,
 * NUMA-local host slots, reused only after the event of their last copy completed) are owned
 * by the caller and released with their close/free/release call.
 *
 * Asynchronous work: calls that take a stream enqueue and return; their failures show either at
 * once (bad arguments, a lost device: the call's return value) or later, when the stream or an
 * event recorded after the work is queried or synchronised (TL_ECUDA with the copy's error,
 * TL_EDEVLOST). A failed operation never leaves a waiter hanging: events recorded after it
 * complete, carrying the error.
 *
 * Thread-safety: the default of threadloom/common.h, and more: devices, events and streams are
 * thread-safe on one object (as CUDA's are), device buffers may be freed from any thread, and
 * staging pools are thread-safe on one object (acquire/release from many producers). */
#ifndef THREADLOOM_DEVICE_H
#define THREADLOOM_DEVICE_H

#include "threadloom/common.h"

TL_BEGIN_DECLS

// ---------------------------------------------------------------------------------------------
// Backends and devices
// ---------------------------------------------------------------------------------------------

typedef enum {
  TL_DEVICE_DEFAULT = 0, /* the selected backend's devices */
  TL_DEVICE_CUDA = 1,    /* CUDA devices (cuda:N) */
  TL_DEVICE_SIM = 2,     /* simulated devices (sim:N) */
  TL_DEVICE_NONE = 3     /* the "none" backend: no devices */
} tl_device_kind_t;

typedef struct tl_device_s tl_device_t;

/* Selects the backend before first use: "cuda", "none", or "sim:N[,option=value...]" with N in
 * 1..64 simulated devices and options (bandwidths in GB/s, GiB/s, MB/s or MiB/s; sizes in B, KB,
 * KiB, MB, MiB, GB, GiB; times in ns, us, ms, s):
 *   h2d=55GB/s d2h=55GB/s   pinned host<->device bandwidth of the copy engines
 *   pageable=9GB/s          the same for pageable (not page-locked) host memory
 *   d2d=2000GB/s            device-to-device copies and memsets (on the compute engine)
 *   mem=16GiB               device memory per device (the sim's out-of-memory limit)
 *   cost=0                  "free" devices: every operation runs at once on the submitting
 *                           thread, taking no modelled time (measures threadloom's own cost)
 *   spin=0us                busy-wait this long before each deadline instead of sleeping
 *                           (completions are observed later than modelled by the sleep's
 *                           overshoot otherwise; throughput is exact either way)
 *   poison=1                fill fresh allocations (0xCD) and freed ones (0xDD)
 * The sim spec also configures the sim devices. Selecting the backend already in use (the same
 * text) is accepted. Errors: TL_EINVAL (bad spec: the detail names the part and the accepted
 * forms), TL_EBUSY (another backend was already selected or used). */
TL_EXTERN int tl_devices_select(const char* spec);

/* Configures the sim devices ("sim:N[,option=value...]", as tl_devices_select) without making
 * sim the selected backend, so a process on another backend can also use sim devices by kind
 * (tests that run on both). Once per process; the same spec again is accepted. Errors:
 * TL_EINVAL, TL_EBUSY (configured differently before). */
TL_EXTERN int tl_sim_configure(const char* spec);

typedef struct {
  tl_device_kind_t kind; /* TL_DEVICE_CUDA, TL_DEVICE_SIM or TL_DEVICE_NONE */
  char name[8];          /* "cuda", "sim", "none" */
  int count;             /* devices of the default list */
  char why[320];         /* why this backend: "THREADLOOM_DEVICES=sim:8", "default: 1 CUDA
                            GPU(s)", "default: no usable GPU (TL_ENODRIVER: cudaGet...)" */
} tl_devices_info_t;

/* The selected backend (selecting the default now if nothing chose one) and why. Errors:
 * TL_EINVAL (NULL; or THREADLOOM_DEVICES is malformed: the detail says how). */
TL_EXTERN int tl_devices_backend(tl_devices_info_t* out);

/* Number of devices of `kind` (TL_DEVICE_DEFAULT: the selected backend's; 0 for none).
 * Errors: TL_EINVAL, and for TL_DEVICE_CUDA the errors of tl_cuda_device_count. */
TL_EXTERN int tl_device_count(tl_device_kind_t kind, int* count);

/* Device `index` of `kind`; opens it on first use (retains the primary context). *out is owned
 * by the library and lives for the process. Errors: TL_EINVAL, TL_ENODEV (no such device: the
 * detail says how many there are and how to get more; sim devices not configured), and for
 * cuda the CUDA errors of opening it (TL_ENODRIVER, TL_ECUDA). */
TL_EXTERN int tl_device_get(tl_device_kind_t kind, int index, tl_device_t** out);

typedef struct {
  tl_device_kind_t kind;  /* TL_DEVICE_CUDA or TL_DEVICE_SIM */
  int index;              /* ordinal within its kind: cuda:index, sim:index */
  char name[256];         /* "NVIDIA H200", "threadloom sim device 3" */
  char pci_bus_id[32];    /* "0000:3b:00.0"; "" for sim */
  size_t total_mem;       /* bytes of device memory */
  int cc_major, cc_minor; /* compute capability (sim: 9.0) */
  int sm_count;           /* multiprocessors (sim: 1) */
  int numa_node;          /* host NUMA node local to the device (sysfs for cuda; sim device i
                             sits on node i mod the machine's nodes), -1 unknown */
  char local_cpus[256];   /* that node's CPUs as a list, "0-15,32-47"; "" unknown */
  int priority_least;     /* stream priorities: least (0) .. greatest (e.g. -5) */
  int priority_greatest;
} tl_device_props_t;

/* The device's properties. Errors: TL_EINVAL. */
TL_EXTERN int tl_device_props(const tl_device_t* dev, tl_device_props_t* out);
/* "cuda:0", "sim:3". Static storage for the process. */
TL_EXTERN const char* tl_device_name(const tl_device_t* dev);
/* Bytes free and in total (the sim: its mem= limit minus live allocations). Errors: as the
 * device's backend (TL_ECUDA, TL_EDEVLOST). */
TL_EXTERN int tl_device_mem_info(tl_device_t* dev, size_t* free_bytes, size_t* total);
/* Waits until all work queued on the device's streams so far has finished (every pooled and
 * acquired stream is synchronised in turn). Errors: the first stream error found. */
TL_EXTERN int tl_device_sync(tl_device_t* dev);

// ---------------------------------------------------------------------------------------------
// Streams: in-order queues of device work. From per-thread pools.
// ---------------------------------------------------------------------------------------------

typedef struct tl_stream_s tl_stream_t;
typedef struct tl_event_s tl_event_t;

/* A stream of `dev` at `priority` (clamped to the device's range; 0 is the default, lower is
 * more urgent: -5 on recent GPUs) from the calling thread's pool, creating one when the pool is
 * empty. The caller uses it until tl_stream_release (from any thread); streams are never
 * destroyed, only pooled, so a handle stays valid memory for the process. Pools are per
 * thread: taking a stream touches no lock shared with other threads (a thread's pool is filled
 * from the device's shared list, under its mutex, only when empty; a thread's pooled streams go
 * back to that list when the thread exits). Errors: TL_EINVAL, TL_EDEVLOST, TL_ECUDA. */
TL_EXTERN int tl_stream_acquire(tl_device_t* dev, int priority, tl_stream_t** out);
/* Returns a stream to the calling thread's pool. Queued work still runs; the next user's work
 * is ordered after it. NULL is ignored. */
TL_EXTERN void tl_stream_release(tl_stream_t* s);
TL_EXTERN tl_device_t* tl_stream_device(const tl_stream_t* s);
TL_EXTERN int tl_stream_priority(const tl_stream_t* s);
/* The backend's handle: a cudaStream_t for cuda (for DLPack, NCCL, torch.cuda.ExternalStream),
 * an opaque non-zero value for sim. */
TL_EXTERN void* tl_stream_handle(const tl_stream_t* s);
/* 0 when all queued work is done, TL_EAGAIN while some is pending, or the error of failed work
 * since the last report (reported once, then cleared). */
TL_EXTERN int tl_stream_query(tl_stream_t* s);
/* Waits until the stream's queued work is done; timeout_ms < 0 waits as long as it takes (the
 * backend's blocking synchronize), >= 0 polls (TL_ETIMEDOUT). Errors: as tl_stream_query. */
TL_EXTERN int tl_stream_sync(tl_stream_t* s, int timeout_ms);
/* Later work on s waits for the event's most recent record (an unrecorded event: no wait).
 * Does not block the calling thread. Errors: TL_EINVAL, TL_EDEVLOST, TL_ECUDA. */
TL_EXTERN int tl_stream_wait_event(tl_stream_t* s, tl_event_t* e);

typedef enum {
  TL_COPY_H2D = 1, /* host to device */
  TL_COPY_D2H = 2, /* device to host */
  TL_COPY_D2D = 3  /* device to device (same or another device of the backend) */
} tl_copy_kind_t;

/* Enqueues a copy of `size` bytes. The host side may be page-locked (arena memory of a pinned
 * arena, staging slots: full speed) or pageable (slower: 9 GB/s modelled on sim; on CUDA the
 * call may return only once the bytes were staged). Both buffers must stay valid, and a host
 * source unchanged, until the copy completed (an event recorded after it). size 0 does nothing.
 * Errors: TL_EINVAL (NULL, bad kind), TL_EDEVLOST, TL_ECUDA; on sim a device range outside a
 * live allocation (use after free, overrun) fails the device with TL_EDEVLOST naming it. */
TL_EXTERN int tl_copy_async(tl_stream_t* s, void* dst, const void* src, size_t size,
                            tl_copy_kind_t kind);
/* Enqueues a memset of device memory (cudaMemsetAsync). Errors: as tl_copy_async. */
TL_EXTERN int tl_memset_async(tl_stream_t* s, void* dst, int value, size_t size);
/* Enqueues a kernel that occupies the device for `ns` nanoseconds (sim: the compute engine;
 * cuda: a one-thread kernel spinning on %globaltimer). ns 0 is the cheapest launch (the launch
 * rate benchmark). Errors: TL_EDEVLOST, TL_ECUDA. */
TL_EXTERN int tl_kernel_async(tl_stream_t* s, uint64_t ns);
/* Enqueues fn(arg) on a backend thread, after the stream's earlier work completed; later work
 * waits for it to return. fn must not call threadloom's device functions (CUDA forbids it). On
 * sim it runs even after an earlier failure or a device loss (so it can free what it holds); on
 * CUDA, a sticky error may keep it from running. Errors (fn is then never called): TL_EINVAL,
 * TL_EDEVLOST, TL_ECUDA. */
TL_EXTERN int tl_stream_callback(tl_stream_t* s, void (*fn)(void* arg), void* arg);

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

enum { TL_EVENT_TIMING = 1 }; /* record timestamps (tl_event_elapsed); costs a little */

/* A new event of `dev` (from the calling thread's cache). The caller owns it and closes it with
 * tl_event_close (pending records still complete). Errors: TL_EINVAL, TL_EDEVLOST, TL_ECUDA. */
TL_EXTERN int tl_event_init(tl_device_t* dev, unsigned flags, tl_event_t** out);
/* NULL is ignored. Returns 0. */
TL_EXTERN int tl_event_close(tl_event_t* e);
/* Records the event on s (a stream of the same device): it completes when the work queued on
 * s before it has. Re-recording moves it. Errors: TL_EINVAL (other device), TL_EDEVLOST,
 * TL_ECUDA. */
TL_EXTERN int tl_event_record(tl_event_t* e, tl_stream_t* s);
/* 0 once the most recent record completed (or never recorded), TL_EAGAIN before, or the error
 * of work that failed on its stream since the previous record (sim), or a sticky error. */
TL_EXTERN int tl_event_query(tl_event_t* e);
/* Makes a stream that threadloom did not create wait for e: `handle` is a cudaStream_t of
 * another library on dev (torch.cuda.Stream.cuda_stream; 1 and 2 are CUDA's legacy and
 * per-thread default streams), or a handle tl_stream_handle gave out. For DLPack exports with
 * stream=. Errors: TL_EINVAL, TL_EDEVLOST, TL_ECUDA. */
TL_EXTERN int tl_event_wait_on(tl_event_t* e, tl_device_t* dev, void* handle);
/* Records e on a stream threadloom did not create (`handle` as for tl_event_wait_on): it
 * completes when that stream's work queued so far has. Errors: TL_EINVAL, TL_EDEVLOST,
 * TL_ECUDA. */
TL_EXTERN int tl_event_record_on(tl_event_t* e, tl_device_t* dev, void* handle);
/* Blocks until the most recent record completed; timeout_ms < 0: no limit (the backend's
 * blocking synchronize), else polls, TL_ETIMEDOUT. Errors: as tl_event_query. */
TL_EXTERN int tl_event_wait(tl_event_t* e, int timeout_ms);
/* Milliseconds between two completed records of TL_EVENT_TIMING events (cudaEventElapsedTime;
 * sim: the modelled times). Errors: TL_EINVAL (no TIMING flag, other devices), TL_EAGAIN (not
 * complete), TL_ECUDA. */
TL_EXTERN int tl_event_elapsed(tl_event_t* start, tl_event_t* end, double* ms);
TL_EXTERN tl_device_t* tl_event_device(const tl_event_t* e);

// ---------------------------------------------------------------------------------------------
// Device memory: a caching allocator per device
//
// Blocks are rounded up to size classes (4 per power of two, 512 bytes at least) and cached
// per stream when freed: a freed block is reused at once by later allocations on the stream it
// was allocated on (stream order makes that safe), and by other streams only after events
// recorded at the free on every stream it was used on (tl_dbuf_record_stream) have completed.
// Frees may come from any thread. On an out-of-memory answer from the device the allocator
// synchronises the device, returns every cached block and tries once more.
// ---------------------------------------------------------------------------------------------

typedef struct {
  void* ptr;          /* device address (sim: host memory of the simulated device) */
  size_t size;        /* bytes requested */
  tl_device_t* device;
} tl_dbuf_t;

/* Allocates `size` (> 0) bytes on s's device for use on s (stream-ordered: the block may have
 * been freed on s by work still queued there). The caller frees it with tl_dbuf_free. Errors:
 * TL_EINVAL, TL_ENOMEM (the detail has the device's use and cache), TL_EDEVLOST, TL_ECUDA. */
TL_EXTERN int tl_dbuf_alloc(tl_stream_t* s, size_t size, tl_dbuf_t** out);
/* The stream b was allocated for (its last uses there are what a consumer must wait for). */
TL_EXTERN tl_stream_t* tl_dbuf_stream(const tl_dbuf_t* b);
/* Returns the block to its stream's cache; from any thread. Work queued on other streams that
 * use it must be declared with tl_dbuf_record_stream first. NULL is ignored. Returns 0, or the
 * error of recording an event on a use stream (the block is then held until the device is
 * synchronised by tl_device_empty_cache). */
TL_EXTERN int tl_dbuf_free(tl_dbuf_t* b);
/* Declares that work on s (other than the allocation stream) uses b, so its free waits for that
 * work before another stream reuses it (torch's record_stream). Thread-safe on one object.
 * Errors: TL_EINVAL (s of another device), TL_ENOMEM. */
TL_EXTERN int tl_dbuf_record_stream(tl_dbuf_t* b, tl_stream_t* s);

typedef struct {
  size_t bytes_in_use;     /* sum of the class sizes of live blocks */
  size_t blocks_in_use;
  size_t bytes_cached;     /* freed blocks kept for reuse (in stream caches and pending) */
  size_t blocks_cached;
  size_t peak_bytes_in_use; /* the sum of each stream's peak: an upper bound of the device's */
  uint64_t allocs;         /* tl_dbuf_alloc calls that succeeded */
  uint64_t cache_hits;     /* of those, served from a cache */
  uint64_t device_allocs;  /* blocks taken from the device (cudaMalloc) */
  uint64_t device_frees;   /* blocks given back (empty_cache, out-of-memory retries) */
  uint64_t oom_retries;    /* out-of-memory answers that emptied the cache and retried */
} tl_dmem_stats_t;

/* tl_dbuf_record_stream for a stream threadloom did not create (`handle` as for
 * tl_event_wait_on: a DLPack consumer's stream, torch.cuda.current_stream().cuda_stream): the
 * free records an event there (tl_event_record_on) and the block waits for it. Thread-safe on
 * one object. Errors: TL_EINVAL, TL_ENOMEM (more than 8 such streams). */
TL_EXTERN int tl_dbuf_record_handle(tl_dbuf_t* b, void* handle);

/* Allocator counters of dev (summed over its streams; not one instant). Errors: TL_EINVAL. */
TL_EXTERN int tl_device_mem_stats(tl_device_t* dev, tl_dmem_stats_t* out);
/* Gives every cached block whose uses completed back to the device (cudaFree). Errors: the
 * device's. */
TL_EXTERN int tl_device_empty_cache(tl_device_t* dev);

// ---------------------------------------------------------------------------------------------
// Pinned staging: host slots for copies, NUMA-local to the device, page-locked through the
// backend, each reused only after the event of its last copy completed.
//
// A producer takes a slot (tl_staging_acquire), writes it, and hands it back by enqueuing its
// copy (tl_staging_copy_to_device: copy + event + release in one call) or with
// tl_staging_release(slot, stream) after work of its own. Either way the pool records the
// slot's event on that stream after the work, and acquire hands out only slots whose event
// completed: a slot cannot be overwritten while a copy still reads it, by construction.
// ---------------------------------------------------------------------------------------------

typedef struct tl_staging_s tl_staging_t;

typedef struct {
  void* ptr;           /* the slot's host memory: page-locked, slot_bytes long */
  size_t size;         /* slot_bytes */
  int index;           /* 0 .. slots-1 */
} tl_staging_slot_t;

typedef struct {
  tl_device_t* device; /* the device the slots feed */
  size_t slot_bytes;   /* bytes per slot (> 0) */
  int slots;           /* number of slots (>= 1) */
  int numa_node;       /* host node of the memory; -1: the device's node */
} tl_staging_options_t;

typedef struct {
  int slots;           /* total */
  int free;            /* ready to hand out */
  int pending;         /* released, their last copy not known to be complete */
  int out;             /* held by producers */
  int pinned;          /* 1: the slots are page-locked (host_register succeeded) */
  char pin_detail[192];
  uint64_t acquires;   /* successful tl_staging_acquire calls */
  uint64_t waits;      /* of those, ones that waited for a copy to complete */
  uint64_t wait_ns;    /* time spent waiting */
} tl_staging_stats_t;

/* A pool of `slots` slots of `slot_bytes`, from an arena on the device's NUMA node, page-locked
 * through the device's backend (the sim records it: pinned bandwidth). The caller owns *out and
 * closes it with tl_staging_close. Errors: TL_EINVAL, TL_ENOMEM, TL_ENODEV, and pinning errors
 * (TL_ECUDA, TL_ENODRIVER: a pool is never silently pageable). */
TL_EXTERN int tl_staging_init(tl_staging_t** out, const tl_staging_options_t* opts);
/* Waits for the pending slots' copies and frees the pool. Errors: TL_EBUSY while producers hold
 * slots (the pool stays usable). NULL is ignored. */
TL_EXTERN int tl_staging_close(tl_staging_t* p);
/* Takes a free slot, waiting up to timeout_ms (< 0: no limit) for the oldest pending copy.
 * Thread-safe on one object. The slot's contents are undefined. *out belongs to the pool; the
 * caller holds it until it hands it back. Errors: TL_ETIMEDOUT, TL_ECLOSED, and a failed copy's
 * error is not one of them: a slot whose copy failed comes back like any other. */
TL_EXTERN int tl_staging_acquire(tl_staging_t* p, int timeout_ms, tl_staging_slot_t** out);
/* Enqueues the copy of the slot's first `size` bytes to device memory `dst` on s, records the
 * slot's event after it and hands the slot back (even when the copy could not be enqueued: the
 * slot then comes back at once). Errors: those of tl_copy_async; TL_EINVAL (size > slot). */
TL_EXTERN int tl_staging_copy_to_device(tl_staging_slot_t* slot, void* dst, size_t size,
                                        tl_stream_t* s);
/* Enqueues a copy of `size` device bytes from src into the slot at byte `offset` on s and
 * records the slot's event; the caller keeps the slot (several copies into one slot on one
 * stream are fine: the event moves to the last), waits with tl_staging_wait before reading it,
 * then releases it with s = NULL. Errors: as tl_copy_async; TL_EINVAL (offset + size > slot). */
TL_EXTERN int tl_staging_copy_from_device(tl_staging_slot_t* slot, size_t offset,
                                          const void* src, size_t size, tl_stream_t* s);
/* Waits for the slot's last copy. Errors: as tl_event_wait. */
TL_EXTERN int tl_staging_wait(tl_staging_slot_t* slot, int timeout_ms);
/* Hands the slot back; when s is not NULL its event is recorded on s first, so the slot is
 * reused only after the work queued there so far. Returns 0, or the error of recording (the
 * slot then waits for a device sync: tl_stream_sync(s) first makes it reusable at once). */
TL_EXTERN int tl_staging_release(tl_staging_slot_t* slot, tl_stream_t* s);
/* Errors: TL_EINVAL. Thread-safe on one object. */
TL_EXTERN int tl_staging_stats(tl_staging_t* p, tl_staging_stats_t* out);

// ---------------------------------------------------------------------------------------------
// Simulated devices: engine statistics, live settings and fault injection (sim devices only;
// other devices answer TL_EINVAL)
// ---------------------------------------------------------------------------------------------

typedef enum { TL_ENGINE_COMPUTE = 0, TL_ENGINE_H2D = 1, TL_ENGINE_D2H = 2, TL_ENGINE_COUNT = 3 }
    tl_engine_t;

typedef struct {
  uint64_t busy_ns;      /* modelled time the engine spent on work since the device opened */
  uint64_t ops;          /* operations it completed */
  uint64_t bytes;        /* bytes it copied */
  uint64_t late_ns;      /* summed delay between each operation's modelled end and the moment
                            its completion was published (the sleep's overshoot) */
  uint64_t late_max_ns;  /* the largest such delay */
  uint64_t wall_ns;      /* time since the device opened (busy_ns / wall_ns = utilization) */
} tl_engine_stats_t;

/* Counters of one engine of a sim device. Thread-safe. Errors: TL_EINVAL (not sim, bad engine).
 */
TL_EXTERN int tl_sim_engine_stats(tl_device_t* dev, tl_engine_t engine, tl_engine_stats_t* out);
/* Changes a sim device's bandwidths while it runs: "h2d=100MB/s", "d2h=...", "pageable=...",
 * "d2d=..." (comma-separated; work already started keeps its old speed). Errors: TL_EINVAL. */
TL_EXTERN int tl_sim_set(tl_device_t* dev, const char* options);

typedef enum {
  TL_SIM_FAULT_OOM = 1,  /* the next `count` device allocations fail (cudaErrorMemoryAllocation) */
  TL_SIM_FAULT_COPY = 2, /* the next `count` copy calls fail with TL_ECUDA and queue nothing (as
                            a cudaMemcpyAsync that refuses a copy) */
  TL_SIM_FAULT_LOST = 3  /* the device is lost now: queued and later work fails, TL_EDEVLOST */
} tl_sim_fault_t;

/* Injects a fault into a sim device. Errors: TL_EINVAL. */
TL_EXTERN int tl_sim_inject(tl_device_t* dev, tl_sim_fault_t fault, int count);
/* The sim device whose live allocation holds [p, p + size) (sim device memory is host memory:
 * a DeviceBuffer of a sim device exported as kDLCPU, e.g. a torch tensor over it, shows only
 * its host address). Thread-safe. Errors: TL_EINVAL (out NULL), TL_ENOENT (no sim device's
 * live block holds the whole range; sim devices not configured). */
TL_EXTERN int tl_sim_owner(const void* p, size_t size, tl_device_t** out);
/* Makes a lost sim device usable again once its queued work has drained (a real GPU never comes
 * back: this exists so one test process can continue). Clears pending injected faults. Errors:
 * TL_EINVAL, TL_ETIMEDOUT (work still running after 10 s). */
TL_EXTERN int tl_sim_recover(tl_device_t* dev);

TL_END_DECLS

#endif /* THREADLOOM_DEVICE_H */
