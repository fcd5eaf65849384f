/* cudactx/backend_sim.c: simulated devices in this process, behind the device backend table.
 *
 * The sim is what lets everything above the table (streams, events, staging, the caching
 * allocator, the feeder, Python) be built and tested without a GPU, the way JAX tests 8-device
 * sharding on one CPU. It behaves like a GPU where that matters to the code above it:
 *
 * - Memory. Device memory is host memory from aligned_alloc with 256 guard bytes on each side
 *   (0xFD), filled with 0xCD when allocated and 0xDD when freed (poison=1). Freed blocks stay
 *   in a quarantine (64 MiB / 4096 blocks per device) before they go back to the C heap, so an
 *   operation that touches freed memory finds it in the device's block map. Every device range
 *   an operation touches is checked against that map when it executes: outside a live block
 *   (use after free, overrun, a host pointer passed as device memory) the operation fails and
 *   the device is lost with a detail naming the block, like a CUDA illegal address (sticky).
 *   Guard bytes are checked at free and by every operation on the block.
 * - Engines. Each device has a compute engine (kernels, memsets, device-to-device copies), an
 *   H2D and a D2H copy engine, and a host engine for callbacks, each a thread that runs ready
 *   operations highest stream priority first, in arrival order. A stream has at most one
 *   operation at an engine at a time (stream order); event records and stream waits are
 *   resolved between operations by whichever thread advances the stream.
 * - Time. Copies take bytes / bandwidth (pinned or pageable: host ranges registered with
 *   host_register count as pinned), kernels their declared time. Time is modelled: an operation
 *   starts at max(its ready time, the engine's free time), both modelled, ends `duration` later,
 *   and its completion carries that modelled end; the engine sleeps (clock_nanosleep to the
 *   absolute end, optionally spinning the last `spin` ns) before publishing it. Since the next
 *   operation starts at the previous modelled end and not at the wake-up, sleep overshoot
 *   delays when completions are observed (late_ns) but never the engine's throughput or its
 *   busy time. The bytes are copied when the operation starts; if that real copy takes longer
 *   than the model allows, the real time wins (the engine cannot be faster than the host).
 * - Zero cost (cost=0). No engine threads: each operation runs on the submitting thread at
 *   once and every event is complete when recorded, for measuring threadloom's own overhead.
 * - Launch cost (launch=2us). Each kernel, copy or memset submission spends that much of the
 *   submitting thread's CPU time before it is queued, as a driver's launch path does: with
 *   cost=0 it models a GPU that keeps up with its launches, where the submitting threads are
 *   the bottleneck (the launch-rate benchmark).
 * - Faults. tl_sim_inject: the next N allocations fail (out of memory), the next N copies fail
 *   (the copy call answers TL__SIM_COPY_FAILED and nothing is queued, as when
 *   cudaMemcpyAsync refuses a copy), or the device is lost (every queued and later operation fails at once; events still
 *   complete, carrying the error, so nothing waits forever).
 *
 * Errors come back as CUDA-style codes (cudaErrorMemoryAllocation, cudaErrorNotReady, ...) plus
 * the TL__SIM_* codes; the text for the calling thread's last failure is in last_detail().
 *
 * Invariants and lock order:
 * - stream.mu guards the stream's queue, its latched error and its spare op nodes. An op is in
 *   exactly one place: a stream's queue (the head may be at an engine or waiting on an event).
 * - engine.mu guards the engine's ready queues. Lock order: stream.mu, then engine.mu or
 *   event.mu; never two streams at once: resuming streams that waited on an event happens
 *   after the completing stream's lock is released (a work list).
 * - event.rec counts records submitted, event.done is the highest completed record (atomics,
 *   read without the lock by query); time, error and the waiter list are under event.mu.
 *   Events are reference counted (the owner plus each queued RECORD/WAIT op).
 * - mem.lock (rwlock) guards a device's block map; pins.lock the registered host ranges.
 * - Engine threads run for the life of the process (like a driver's); a device's engines start
 *   when it is opened. */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cudactx/internal.h"

#define TL__SIM_MAX 64
#define TL__SIM_PRIOS 6               /* priorities 0 (least) .. -5 (greatest), as on H100 */
#define TL__SIM_GUARD 256             /* guard bytes on each side of a block */
#define TL__SIM_QUARANTINE (64u << 20) /* freed bytes kept per device before reuse */
#define TL__SIM_QUARANTINE_N 4096     /* freed blocks kept per device */

enum { OP_COPY, OP_MEMSET, OP_KERNEL, OP_HOSTFN, OP_RECORD, OP_WAIT };
enum { ENG_COMPUTE, ENG_H2D, ENG_D2H, ENG_HOST, ENG_N };

typedef struct sim_dev sim_dev;
typedef struct sim_stream sim_stream;
typedef struct sim_event sim_event;
typedef struct sim_op sim_op;

// ---------------------------------------------------------------------------------------------
// Time and the calling thread's detail
// ---------------------------------------------------------------------------------------------

static uint64_t tl__now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Sleeps until the monotonic time t (ns), the last spin_ns busy-waiting. */
static void tl__sleep_until(uint64_t t, uint64_t spin_ns) {
  if (t > spin_ns) {
    uint64_t wake = t - spin_ns;
    struct timespec ts = {(time_t)(wake / 1000000000u), (long)(wake % 1000000000u)};
    while (tl__now() < wake && clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
  }
  while (tl__now() < t) {
  }
}

static _Thread_local char tl__sim_detail[320];

/* Hands the text over once: a later failure without a text of its own never shows it. */
static const char* tl__sim_last_detail(void) {
  static _Thread_local char taken[sizeof tl__sim_detail];
  memcpy(taken, tl__sim_detail, sizeof taken);
  tl__sim_detail[0] = '\0';
  return taken;
}

static int tl__sim_fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
static int tl__sim_fail(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(tl__sim_detail, sizeof tl__sim_detail, fmt, ap);
  va_end(ap);
  return code;
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

typedef struct {
  int count;          /* devices */
  uint64_t h2d;       /* pinned host-to-device bytes/s */
  uint64_t d2h;       /* pinned device-to-host bytes/s */
  uint64_t pageable;  /* pageable host memory, both directions, bytes/s */
  uint64_t d2d;       /* device-to-device copies and memsets, bytes/s */
  uint64_t mem;       /* bytes of memory per device */
  int zero_cost;      /* cost=0: operations run inline and take no time */
  uint64_t spin_ns;   /* busy-wait before deadlines */
  int poison;         /* fill patterns on alloc and free */
  uint64_t launch_ns; /* CPU time each kernel, copy or memset submission costs its thread */
  uint64_t launch_iters; /* launch_ns as iterations of tl__spend_cpu's loop (calibrated) */
} sim_cfg;

static const sim_cfg tl__sim_defaults = {
    .count = 0,
    .h2d = 55000000000ull,
    .d2h = 55000000000ull,
    .pageable = 9000000000ull,
    .d2d = 2000000000000ull,
    .mem = 16ull << 30,
    .zero_cost = 0,
    .spin_ns = 0,
    .poison = 1,
    .launch_ns = 0,
};

/* Parses "<number><unit>" where unit is one of `units` (name, factor); the number may have a
 * fraction. Returns 0 or -1. */
typedef struct {
  const char* name;
  double factor;
} sim_unit;

static int tl__parse_quantity(const char* v, const sim_unit* units, double* out) {
  char* end;
  errno = 0;
  double x = strtod(v, &end);
  if (end == v || errno || !(x >= 0)) return -1;
  for (const sim_unit* u = units; u->name; u++)
    if (strcmp(end, u->name) == 0) {
      *out = x * u->factor;
      return 0;
    }
  return -1;
}

static const sim_unit tl__bw_units[] = {{"GB/s", 1e9}, {"GiB/s", 1073741824.0}, {"MB/s", 1e6},
                                        {"MiB/s", 1048576.0}, {"KB/s", 1e3}, {"B/s", 1}, {NULL, 0}};
static const sim_unit tl__size_units[] = {{"GiB", 1073741824.0}, {"GB", 1e9}, {"MiB", 1048576.0},
                                          {"MB", 1e6}, {"KiB", 1024.0}, {"KB", 1e3}, {"B", 1},
                                          {NULL, 0}};
static const sim_unit tl__time_units[] = {{"ns", 1}, {"us", 1e3}, {"ms", 1e6}, {"s", 1e9},
                                          {NULL, 0}};

/* Applies one "key=value" to cfg. live: only the bandwidths may change (a running device). */
static int tl__sim_option(sim_cfg* cfg, const char* opt, int live) {
  const char* eq = strchr(opt, '=');
  char key[32];
  size_t klen = eq ? (size_t)(eq - opt) : 0;
  if (!eq || klen == 0 || klen >= sizeof key)
    return tl__fail(TL_EINVAL, "sim option '%s' is not key=value (e.g. h2d=25GB/s)", opt);
  memcpy(key, opt, klen);
  key[klen] = '\0';
  const char* v = eq + 1;
  double x;
  uint64_t* bw = strcmp(key, "h2d") == 0 ? &cfg->h2d
               : strcmp(key, "d2h") == 0 ? &cfg->d2h
               : strcmp(key, "pageable") == 0 ? &cfg->pageable
               : strcmp(key, "d2d") == 0 ? &cfg->d2d : NULL;
  if (bw) {
    if (tl__parse_quantity(v, tl__bw_units, &x) < 0 || x < 1)
      return tl__fail(TL_EINVAL, "sim option %s=%s: give a bandwidth like 25GB/s, 12.5GiB/s or "
                      "800MB/s (at least 1B/s)", key, v);
    *bw = (uint64_t)x;
    return 0;
  }
  if (live)
    return tl__fail(TL_EINVAL, "sim option '%s' cannot change on a running device: only h2d, "
                    "d2h, pageable and d2d can (set the others in THREADLOOM_DEVICES)", key);
  if (strcmp(key, "mem") == 0) {
    if (tl__parse_quantity(v, tl__size_units, &x) < 0 || x < 1 << 20)
      return tl__fail(TL_EINVAL, "sim option mem=%s: give a size like 16GiB or 512MiB (at least "
                      "1MiB)", v);
    cfg->mem = (uint64_t)x;
  } else if (strcmp(key, "cost") == 0) {
    if (strcmp(v, "0") != 0 && strcmp(v, "1") != 0)
      return tl__fail(TL_EINVAL, "sim option cost=%s: 0 (operations are free and run at once) or "
                      "1 (modelled time, the default)", v);
    cfg->zero_cost = v[0] == '0';
  } else if (strcmp(key, "spin") == 0) {
    if (tl__parse_quantity(v, tl__time_units, &x) < 0 || x > 1e9)
      return tl__fail(TL_EINVAL, "sim option spin=%s: give a time like 50us (at most 1s)", v);
    cfg->spin_ns = (uint64_t)x;
  } else if (strcmp(key, "launch") == 0) {
    if (tl__parse_quantity(v, tl__time_units, &x) < 0 || x > 1e7)
      return tl__fail(TL_EINVAL, "sim option launch=%s: give a time like 2us (at most 10ms)", v);
    cfg->launch_ns = (uint64_t)x;
  } else if (strcmp(key, "poison") == 0) {
    if (strcmp(v, "0") != 0 && strcmp(v, "1") != 0)
      return tl__fail(TL_EINVAL, "sim option poison=%s: 1 (fill patterns, the default) or 0", v);
    cfg->poison = v[0] == '1';
  } else {
    return tl__fail(TL_EINVAL, "unknown sim option '%s': the options are h2d, d2h, pageable, d2d "
                    "(bandwidths), mem (size), cost (0/1), spin (time), launch (time), poison "
                    "(0/1)", key);
  }
  return 0;
}

/* Applies a comma-separated option list. */
static int tl__sim_options(sim_cfg* cfg, const char* list, int live) {
  char buf[256];
  if (strlen(list) >= sizeof buf) return tl__fail(TL_EINVAL, "sim options longer than 255 bytes");
  tl__strlcpy(buf, list, sizeof buf);
  char* save = NULL;
  for (char* tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    int err = tl__sim_option(cfg, tok, live);
    if (err) return err;
  }
  return 0;
}

/* launch=: the submitting thread spends CPU time in a loop of `iters` iterations, calibrated
 * against its CPU clock when the sim is configured, so the cost is CPU work as a driver's
 * launch path is (time the thread is descheduled does not count, and no clock is read per
 * launch). */
__attribute__((noinline)) static void tl__spend_cpu(uint64_t iters) {
  for (volatile uint64_t i = 0; i < iters; i++) {
  }
}

static uint64_t tl__thread_cpu_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Iterations of tl__spend_cpu's loop that take `ns` of CPU: the fastest of 5 timed runs. */
static uint64_t tl__calibrate_spend(uint64_t ns) {
  if (!ns) return 0;
  const uint64_t probe = 1u << 20;
  uint64_t best = UINT64_MAX;
  for (int k = 0; k < 5; k++) {
    uint64_t t0 = tl__thread_cpu_ns();
    tl__spend_cpu(probe);
    uint64_t dt = tl__thread_cpu_ns() - t0;
    if (dt && dt < best) best = dt;
  }
  if (best == UINT64_MAX) best = 1;
  uint64_t iters = (uint64_t)((double)ns * (double)probe / (double)best);
  return iters ? iters : 1;
}

// ---------------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------------

struct sim_op {
  sim_op* next;           /* stream queue link (stream.mu) */
  sim_op* qnext;          /* engine queue link (engine.mu) */
  sim_stream* s;          /* the stream it was submitted to */
  int type;               /* OP_* */
  int kind;               /* OP_COPY: TL__COPY_* */
  int value;              /* OP_MEMSET: the byte */
  void* dst;              /* OP_COPY, OP_MEMSET */
  const void* src;        /* OP_COPY */
  size_t n;               /* bytes */
  uint64_t ns;            /* OP_KERNEL: declared duration */
  sim_event* ev;          /* OP_RECORD, OP_WAIT (holds a reference) */
  uint64_t seq;           /* the record number (RECORD) or the one waited for (WAIT) */
  void (*fn)(void*);      /* OP_HOSTFN */
  void* arg;
  uint64_t submit;        /* real time of submission */
  uint64_t ready;         /* modelled time it may start (set when it reaches an engine) */
};

struct sim_stream {
  sim_dev* d;             /* immutable */
  int prio;               /* 0 .. TL__SIM_PRIOS-1: 0 least urgent (CUDA priority 0) */
  pthread_mutex_t mu;
  pthread_cond_t idle;    /* signalled when the queue empties */
  sim_op* head;           /* queued operations, oldest first; head may be in flight */
  sim_op* tail;
  int busy;               /* head is at an engine or waits on an event */
  uint64_t last_end;      /* modelled end of the last completed operation (or event waited) */
  int err;                /* first error not yet reported by query/sync (latched) */
  char detail[256];       /* its text */
  int err_evented;        /* the first event recorded after it carries it; later ones do not */
  sim_op* spare;          /* recycled op nodes */
};

typedef struct {
  sim_stream* s;          /* a stream whose head WAIT op waits */
  uint64_t seq;           /* for this record */
} sim_waiter;

struct sim_event {
  sim_dev* d;
  int timing;
  pthread_mutex_t mu;
  pthread_cond_t cv;      /* broadcast when `done` advances */
  _Atomic uint64_t rec;   /* records submitted (shared: query reads it without mu) */
  _Atomic uint64_t done;  /* highest completed record (shared, as rec) */
  uint64_t time;          /* modelled time of that completion (mu) */
  int err;                /* error carried by the latest completion (mu) */
  char detail[256];
  sim_waiter* waiters;    /* streams waiting (mu) */
  size_t nwaiters, capwaiters;
  _Atomic int refs;       /* owner + queued RECORD/WAIT ops */
};

typedef struct {
  sim_dev* d;
  int which;              /* ENG_* */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  sim_op* qh[TL__SIM_PRIOS]; /* ready operations per priority, FIFO (mu) */
  sim_op* qt[TL__SIM_PRIOS];
  uint64_t free_at;       /* modelled end of its last operation (engine thread only) */
  double ns_per_byte;     /* the host's measured memcpy speed (engine thread only) */
  _Atomic uint64_t busy_ns, ops, bytes, late_ns, late_max; /* stats, read by any thread */
} sim_engine;

typedef struct {
  uintptr_t base;         /* the address handed out */
  size_t size;            /* bytes requested */
  size_t span;            /* bytes between the guards (size rounded up to 256) */
  int freed;              /* 1: in quarantine */
} sim_block;

struct sim_dev {
  int index;
  pthread_mutex_t mu;     /* opening, lost detail */
  _Atomic int opened;
  uint64_t t0;            /* when it opened (stats' wall time) */
  sim_engine eng[ENG_N];
  _Atomic uint64_t bw[4]; /* h2d, d2h, pageable, d2d: live-settable */
  /* memory */
  pthread_rwlock_t mem_lock;
  sim_block* blocks;      /* sorted by base (mem_lock) */
  size_t nblocks, capblocks;
  uintptr_t* quarantine;  /* bases of freed blocks, oldest first (a ring) */
  size_t qhead, qn;
  size_t qbytes;
  size_t used;            /* live bytes (spans) */
  /* faults */
  _Atomic int oom_left, copy_fail_left;
  _Atomic int lost;
  char lost_detail[256];  /* written once, before lost is set (mu) */
  _Atomic long queued;    /* operations queued on its streams (recover waits for 0) */
};

static struct {
  pthread_mutex_t mu;     /* configure */
  _Atomic int configured;
  char spec[256];
  sim_cfg cfg;            /* written once under mu, before configured is set */
  sim_dev* devs[TL__SIM_MAX];
} tl__sim = {.mu = PTHREAD_MUTEX_INITIALIZER};

static struct {
  pthread_rwlock_t lock;
  struct { uintptr_t base; size_t size; } * v; /* sorted by base */
  size_t n, cap;
} tl__pins = {.lock = PTHREAD_RWLOCK_INITIALIZER};

int tl__sim_configured(void) { return atomic_load(&tl__sim.configured); }
const char* tl__sim_spec(void) { return tl__sim.spec; }

int tl__sim_configure(const char* spec) {
  tl__clear_detail();
  if (!spec || strncmp(spec, "sim:", 4) != 0)
    return tl__fail(TL_EINVAL, "'%s' is not a sim spec: sim:N[,option=value...]",
                    spec ? spec : "(null)");
  pthread_mutex_lock(&tl__sim.mu);
  int err = 0;
  if (atomic_load(&tl__sim.configured)) {
    if (strcmp(tl__sim.spec, spec) != 0)
      err = tl__fail(TL_EBUSY, "sim devices are already configured as '%s'; '%s' would change "
                     "them: configure once, before first use", tl__sim.spec, spec);
    pthread_mutex_unlock(&tl__sim.mu);
    return err;
  }
  sim_cfg cfg = tl__sim_defaults;
  char* end;
  long n = strtol(spec + 4, &end, 10);
  if (end == spec + 4 || n < 1 || n > TL__SIM_MAX || (*end && *end != ',')) {
    pthread_mutex_unlock(&tl__sim.mu);
    return tl__fail(TL_EINVAL, "'%s': the device count after sim: must be 1..%d (sim:8, or "
                    "sim:8,h2d=25GB/s)", spec, TL__SIM_MAX);
  }
  cfg.count = (int)n;
  if (*end == ',' && (err = tl__sim_options(&cfg, end + 1, 0)) != 0) {
    pthread_mutex_unlock(&tl__sim.mu);
    return err;
  }
  for (int i = 0; i < cfg.count; i++) {
    sim_dev* d = calloc(1, sizeof *d);
    if (!d) {
      for (int j = 0; j < i; j++) free(tl__sim.devs[j]);
      pthread_mutex_unlock(&tl__sim.mu);
      return tl__fail(TL_ENOMEM, "sim: %zu bytes for a device", sizeof *d);
    }
    d->index = i;
    pthread_mutex_init(&d->mu, NULL);
    pthread_rwlock_init(&d->mem_lock, NULL);
    atomic_init(&d->bw[0], cfg.h2d);
    atomic_init(&d->bw[1], cfg.d2h);
    atomic_init(&d->bw[2], cfg.pageable);
    atomic_init(&d->bw[3], cfg.d2d);
    for (int e = 0; e < ENG_N; e++) {
      d->eng[e].d = d;
      d->eng[e].which = e;
      pthread_mutex_init(&d->eng[e].mu, NULL);
      pthread_cond_init(&d->eng[e].cv, NULL);
    }
    tl__sim.devs[i] = d;
  }
  cfg.launch_iters = tl__calibrate_spend(cfg.launch_ns);
  tl__sim.cfg = cfg;
  tl__strlcpy(tl__sim.spec, spec, sizeof tl__sim.spec);
  atomic_store(&tl__sim.configured, 1);
  pthread_mutex_unlock(&tl__sim.mu);
  return 0;
}

static sim_dev* tl__sim_dev(int dev) {
  if (!atomic_load(&tl__sim.configured) || dev < 0 || dev >= tl__sim.cfg.count) return NULL;
  return tl__sim.devs[dev];
}

static int tl__lost(sim_dev* d) {
  if (!atomic_load_explicit(&d->lost, memory_order_acquire)) return 0;
  return tl__sim_fail(TL__SIM_DEVICE_LOST, "sim:%d is lost: %s", d->index, d->lost_detail);
}

/* Marks the device lost (first reason wins). */
static void tl__lose(sim_dev* d, const char* why) {
  pthread_mutex_lock(&d->mu);
  if (!atomic_load(&d->lost)) {
    tl__strlcpy(d->lost_detail, why, sizeof d->lost_detail);
    atomic_store_explicit(&d->lost, 1, memory_order_release);
  }
  pthread_mutex_unlock(&d->mu);
}

// ---------------------------------------------------------------------------------------------
// Host registration (pinned memory)
// ---------------------------------------------------------------------------------------------

static int tl__sim_host_register(void* p, size_t size) {
  if (!p || size == 0) return tl__sim_fail(TL__CUDA_INVALID_VALUE, "host_register(%p, %zu)", p, size);
  uintptr_t b = (uintptr_t)p;
  int rc = 0;
  pthread_rwlock_wrlock(&tl__pins.lock);
  size_t i = 0;
  while (i < tl__pins.n && tl__pins.v[i].base < b) i++;
  if ((i > 0 && tl__pins.v[i - 1].base + tl__pins.v[i - 1].size > b) ||
      (i < tl__pins.n && tl__pins.v[i].base < b + size)) {
    rc = tl__sim_fail(TL__CUDA_HOST_MEMORY_ALREADY_REGISTERED,
                      "[%p, +%zu) overlaps a registered range", p, size);
  } else {
    if (tl__pins.n == tl__pins.cap) {
      size_t cap = tl__pins.cap ? 2 * tl__pins.cap : 16;
      void* v = realloc(tl__pins.v, cap * sizeof *tl__pins.v);
      if (!v) rc = tl__sim_fail(TL__CUDA_MEMORY_ALLOCATION, "host_register bookkeeping");
      else {
        tl__pins.v = v;
        tl__pins.cap = cap;
      }
    }
    if (!rc) {
      memmove(&tl__pins.v[i + 1], &tl__pins.v[i], (tl__pins.n - i) * sizeof *tl__pins.v);
      tl__pins.v[i].base = b;
      tl__pins.v[i].size = size;
      tl__pins.n++;
    }
  }
  pthread_rwlock_unlock(&tl__pins.lock);
  return rc;
}

static int tl__sim_host_unregister(void* p) {
  int rc = tl__sim_fail(TL__CUDA_HOST_MEMORY_NOT_REGISTERED, "%p was not registered", p);
  pthread_rwlock_wrlock(&tl__pins.lock);
  for (size_t i = 0; i < tl__pins.n; i++)
    if (tl__pins.v[i].base == (uintptr_t)p) {
      memmove(&tl__pins.v[i], &tl__pins.v[i + 1], (tl__pins.n - i - 1) * sizeof *tl__pins.v);
      tl__pins.n--;
      rc = 0;
      break;
    }
  pthread_rwlock_unlock(&tl__pins.lock);
  return rc;
}

/* 1 if [p, p+n) lies in one registered range. */
static int tl__pinned(const void* p, size_t n) {
  uintptr_t b = (uintptr_t)p;
  int yes = 0;
  pthread_rwlock_rdlock(&tl__pins.lock);
  size_t lo = 0, hi = tl__pins.n;
  while (lo < hi) { /* first range with base > b */
    size_t mid = (lo + hi) / 2;
    if (tl__pins.v[mid].base <= b) lo = mid + 1;
    else hi = mid;
  }
  if (lo > 0 && b + n <= tl__pins.v[lo - 1].base + tl__pins.v[lo - 1].size) yes = 1;
  pthread_rwlock_unlock(&tl__pins.lock);
  return yes;
}

// ---------------------------------------------------------------------------------------------
// Device memory
// ---------------------------------------------------------------------------------------------

/* Index of the block with the greatest base <= p, or -1 (mem_lock held). */
static long tl__block_find(const sim_dev* d, uintptr_t p) {
  size_t lo = 0, hi = d->nblocks;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (d->blocks[mid].base <= p) lo = mid + 1;
    else hi = mid;
  }
  return (long)lo - 1;
}

static int tl__guards_ok(const sim_block* b) {
  const unsigned char* lo = (const unsigned char*)b->base - TL__SIM_GUARD;
  const unsigned char* hi = (const unsigned char*)b->base + b->size;
  size_t nhi = b->span - b->size + TL__SIM_GUARD;
  for (size_t i = 0; i < TL__SIM_GUARD; i++)
    if (lo[i] != 0xFD) return 0;
  for (size_t i = 0; i < nhi; i++)
    if (hi[i] != 0xFD) return 0;
  return 1;
}

/* Checks that [p, p+n) is inside one live block of d (mem_lock read-held by the caller not
 * needed: takes it). 0, or TL__SIM_DEVICE_LOST with the detail written into why. */
static int tl__range_ok(sim_dev* d, const void* p, size_t n, const char* what, char* why,
                        size_t cap) {
  uintptr_t a = (uintptr_t)p;
  int ok = 0;
  pthread_rwlock_rdlock(&d->mem_lock);
  long i = tl__block_find(d, a);
  if (i < 0 || a >= d->blocks[i].base + d->blocks[i].span + TL__SIM_GUARD) {
    snprintf(why, cap, "illegal address: %s of %zu bytes at %p is not in any allocation of "
             "sim:%d (a host pointer passed as device memory, or a block freed long ago)", what,
             n, p, d->index);
  } else {
    const sim_block* b = &d->blocks[i];
    size_t off = a - b->base;
    if (b->freed)
      snprintf(why, cap, "illegal address: use after free: %s of %zu bytes at offset %zu of a "
               "%zu-byte block of sim:%d that was freed", what, n, off, b->size, d->index);
    else if (a < b->base || off + n > b->size)
      snprintf(why, cap, "illegal address: %s of %zu bytes at offset %zu overruns the %zu-byte "
               "block at %p of sim:%d", what, n, off, b->size, (void*)b->base, d->index);
    else if (!tl__guards_ok(b))
      snprintf(why, cap, "memory corruption: the guard bytes of the %zu-byte block at %p of "
               "sim:%d were overwritten (a write past its end)", b->size, (void*)b->base, d->index);
    else
      ok = 1;
  }
  pthread_rwlock_unlock(&d->mem_lock);
  return ok ? 0 : TL__SIM_DEVICE_LOST;
}

/* Which configured device holds p (for copies between devices), or NULL. */
static sim_dev* tl__owner(const void* p) {
  for (int i = 0; i < tl__sim.cfg.count; i++) {
    sim_dev* d = tl__sim.devs[i];
    if (!atomic_load(&d->opened)) continue;
    pthread_rwlock_rdlock(&d->mem_lock);
    long k = tl__block_find(d, (uintptr_t)p);
    int in = k >= 0 && (uintptr_t)p < d->blocks[k].base + d->blocks[k].span + TL__SIM_GUARD;
    pthread_rwlock_unlock(&d->mem_lock);
    if (in) return d;
  }
  return NULL;
}

int tl__sim_owner_index(const void* p, size_t n) {
  uintptr_t a = (uintptr_t)p;
  for (int i = 0; i < tl__sim.cfg.count; i++) {
    sim_dev* d = tl__sim.devs[i];
    if (!d || !atomic_load(&d->opened)) continue;
    pthread_rwlock_rdlock(&d->mem_lock);
    long k = tl__block_find(d, a);
    int in = k >= 0 && !d->blocks[k].freed && a >= d->blocks[k].base &&
             n <= d->blocks[k].size && a - d->blocks[k].base <= d->blocks[k].size - n;
    pthread_rwlock_unlock(&d->mem_lock);
    if (in) return i;
  }
  return -1;
}

static int tl__sim_mem_alloc(int dev, size_t size, void** out) {
  sim_dev* d = tl__sim_dev(dev);
  if (!d) return tl__sim_fail(TL__CUDA_INVALID_DEVICE, "no sim:%d", dev);
  int rc = tl__lost(d);
  if (rc) return rc;
  if (size == 0) {
    *out = NULL;
    return 0;
  }
  int left = atomic_load(&d->oom_left);
  while (left > 0 && !atomic_compare_exchange_weak(&d->oom_left, &left, left - 1)) {
  }
  if (left > 0)
    return tl__sim_fail(TL__CUDA_MEMORY_ALLOCATION, "sim:%d: injected out-of-memory (%zu bytes)",
                        d->index, size);
  if (size > ((size_t)1 << 48)) return tl__sim_fail(TL__CUDA_MEMORY_ALLOCATION, "%zu bytes", size);
  size_t span = (size + TL__SIM_GUARD - 1) & ~(size_t)(TL__SIM_GUARD - 1);
  pthread_rwlock_wrlock(&d->mem_lock);
  if (d->used + span > tl__sim.cfg.mem) {
    size_t used = d->used;
    pthread_rwlock_unlock(&d->mem_lock);
    return tl__sim_fail(TL__CUDA_MEMORY_ALLOCATION, "sim:%d: %zu bytes requested, %zu of %llu in "
                        "use (mem=)", d->index, size, used, (unsigned long long)tl__sim.cfg.mem);
  }
  d->used += span;
  pthread_rwlock_unlock(&d->mem_lock);
  unsigned char* raw = aligned_alloc(TL__SIM_GUARD, span + 2 * TL__SIM_GUARD);
  if (!raw) {
    pthread_rwlock_wrlock(&d->mem_lock);
    d->used -= span;
    pthread_rwlock_unlock(&d->mem_lock);
    return tl__sim_fail(TL__CUDA_MEMORY_ALLOCATION, "sim:%d: the host has no %zu bytes", d->index,
                        span + 2 * TL__SIM_GUARD);
  }
  unsigned char* p = raw + TL__SIM_GUARD;
  memset(raw, 0xFD, TL__SIM_GUARD);
  memset(p + size, 0xFD, span - size + TL__SIM_GUARD);
  if (tl__sim.cfg.poison) memset(p, 0xCD, size);
  pthread_rwlock_wrlock(&d->mem_lock);
  if (d->nblocks == d->capblocks) {
    size_t cap = d->capblocks ? 2 * d->capblocks : 64;
    sim_block* v = realloc(d->blocks, cap * sizeof *v);
    if (!v) {
      d->used -= span;
      pthread_rwlock_unlock(&d->mem_lock);
      free(raw);
      return tl__sim_fail(TL__CUDA_MEMORY_ALLOCATION, "sim: block map");
    }
    d->blocks = v;
    d->capblocks = cap;
  }
  long i = tl__block_find(d, (uintptr_t)p) + 1;
  memmove(&d->blocks[i + 1], &d->blocks[i], (d->nblocks - (size_t)i) * sizeof *d->blocks);
  d->blocks[i] = (sim_block){.base = (uintptr_t)p, .size = size, .span = span, .freed = 0};
  d->nblocks++;
  pthread_rwlock_unlock(&d->mem_lock);
  *out = p;
  return 0;
}

/* Removes the quarantined block at base from the map and frees it (mem_lock write-held). */
static void tl__evict(sim_dev* d, uintptr_t base) {
  long i = tl__block_find(d, base);
  if (i < 0 || d->blocks[i].base != base) return;
  d->qbytes -= d->blocks[i].span;
  free((unsigned char*)base - TL__SIM_GUARD);
  memmove(&d->blocks[i], &d->blocks[i + 1], (d->nblocks - (size_t)i - 1) * sizeof *d->blocks);
  d->nblocks--;
}

static int tl__sim_mem_free(int dev, void* p) {
  sim_dev* d = tl__sim_dev(dev);
  if (!d) return tl__sim_fail(TL__CUDA_INVALID_DEVICE, "no sim:%d", dev);
  if (!p) return 0;
  int rc = 0;
  char why[256] = "";
  pthread_rwlock_wrlock(&d->mem_lock);
  long i = tl__block_find(d, (uintptr_t)p);
  if (i < 0 || d->blocks[i].base != (uintptr_t)p) {
    rc = tl__sim_fail(TL__CUDA_INVALID_VALUE, "free of %p: not the start of an allocation of "
                      "sim:%d", p, d->index);
  } else if (d->blocks[i].freed) {
    rc = tl__sim_fail(TL__CUDA_INVALID_VALUE, "double free of the %zu-byte block at %p of sim:%d",
                      d->blocks[i].size, p, d->index);
  } else {
    sim_block* b = &d->blocks[i];
    if (!tl__guards_ok(b)) {
      snprintf(why, sizeof why, "memory corruption: the guard bytes of the %zu-byte block at %p "
               "were overwritten (found at free)", b->size, p);
      rc = tl__sim_fail(TL__SIM_DEVICE_LOST, "sim:%d: %s", d->index, why);
    }
    if (tl__sim.cfg.poison) memset(p, 0xDD, b->size);
    b->freed = 1;
    d->used -= b->span;
    d->qbytes += b->span;
    if (!d->quarantine) d->quarantine = calloc(TL__SIM_QUARANTINE_N, sizeof *d->quarantine);
    if (!d->quarantine) {
      tl__evict(d, (uintptr_t)p);
    } else {
      if (d->qn == TL__SIM_QUARANTINE_N) {
        tl__evict(d, d->quarantine[d->qhead]);
        d->qhead = (d->qhead + 1) % TL__SIM_QUARANTINE_N;
        d->qn--;
      }
      d->quarantine[(d->qhead + d->qn) % TL__SIM_QUARANTINE_N] = (uintptr_t)p;
      d->qn++;
      while (d->qbytes > TL__SIM_QUARANTINE && d->qn > 0) {
        tl__evict(d, d->quarantine[d->qhead]);
        d->qhead = (d->qhead + 1) % TL__SIM_QUARANTINE_N;
        d->qn--;
      }
    }
  }
  pthread_rwlock_unlock(&d->mem_lock);
  if (why[0]) tl__lose(d, why);
  return rc;
}

static int tl__sim_mem_info(int dev, size_t* free_bytes, size_t* total) {
  sim_dev* d = tl__sim_dev(dev);
  if (!d) return tl__sim_fail(TL__CUDA_INVALID_DEVICE, "no sim:%d", dev);
  int rc = tl__lost(d);
  if (rc) return rc;
  pthread_rwlock_rdlock(&d->mem_lock);
  *total = tl__sim.cfg.mem;
  *free_bytes = tl__sim.cfg.mem - d->used;
  pthread_rwlock_unlock(&d->mem_lock);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Executing one operation (an engine thread, or the submitting thread with cost=0)
// ---------------------------------------------------------------------------------------------

/* Modelled duration of op in ns. */
static uint64_t tl__duration(const sim_op* op) {
  sim_dev* d = op->s->d;
  if (tl__sim.cfg.zero_cost) return 0;
  uint64_t bw;
  switch (op->type) {
    case OP_KERNEL: return op->ns;
    case OP_MEMSET: bw = atomic_load(&d->bw[3]); break;
    case OP_COPY:
      if (op->kind == TL__COPY_D2D) bw = atomic_load(&d->bw[3]);
      else if (op->kind == TL__COPY_H2D)
        bw = tl__pinned(op->src, op->n) ? atomic_load(&d->bw[0]) : atomic_load(&d->bw[2]);
      else
        bw = tl__pinned(op->dst, op->n) ? atomic_load(&d->bw[1]) : atomic_load(&d->bw[2]);
      break;
    default: return 0;
  }
  return (uint64_t)((double)op->n * 1e9 / (double)bw);
}

/* Performs op's effect. Returns 0 or a code, with the text in why. */
static int tl__execute(sim_op* op, char* why, size_t cap) {
  sim_dev* d = op->s->d;
  if (op->type == OP_HOSTFN) { /* host work runs even on a lost device: it may free resources */
    op->fn(op->arg);
    return 0;
  }
  if (atomic_load_explicit(&d->lost, memory_order_acquire)) {
    snprintf(why, cap, "sim:%d is lost: %.200s", d->index, d->lost_detail);
    return TL__SIM_DEVICE_LOST;
  }
  int rc = 0;
  switch (op->type) {
    case OP_KERNEL: return 0;
    case OP_MEMSET:
      if ((rc = tl__range_ok(d, op->dst, op->n, "memset", why, cap)) != 0) break;
      memset(op->dst, op->value, op->n);
      return 0;
    case OP_COPY: {
      if (op->kind != TL__COPY_H2D) {
        sim_dev* o = tl__owner(op->src);
        if ((rc = tl__range_ok(o ? o : d, op->src, op->n, "copy source", why, cap)) != 0) break;
      }
      if (op->kind != TL__COPY_D2H) {
        sim_dev* o = tl__owner(op->dst);
        if ((rc = tl__range_ok(o ? o : d, op->dst, op->n, "copy destination", why, cap)) != 0)
          break;
      }
      memmove(op->dst, op->src, op->n);
      return 0;
    }
  }
  tl__lose(d, why); /* an illegal address is sticky, as on a GPU */
  return rc;
}

// ---------------------------------------------------------------------------------------------
// Streams, events and the engines: advancing a stream
// ---------------------------------------------------------------------------------------------

typedef struct {
  sim_stream** v;   /* streams to advance once the current lock is released */
  size_t n, cap;
} worklist;

static void tl__work_push(worklist* w, sim_stream* s) {
  if (w->n == w->cap) {
    size_t cap = w->cap ? 2 * w->cap : 8;
    sim_stream** v = realloc(w->v, cap * sizeof *v);
    if (!v) abort(); /* a few pointers; nothing sensible to do without them */
    w->v = v;
    w->cap = cap;
  }
  w->v[w->n++] = s;
}

static void tl__event_unref(sim_event* e) {
  if (atomic_fetch_sub(&e->refs, 1) != 1) return;
  pthread_mutex_destroy(&e->mu);
  pthread_cond_destroy(&e->cv);
  free(e->waiters);
  free(e);
}

/* Completes record `seq` of e at modelled time t with err; the streams waiting for it go into w. */
static void tl__event_complete(sim_event* e, uint64_t seq, uint64_t t, int err,
                               const char* detail, worklist* w) {
  pthread_mutex_lock(&e->mu);
  if (seq > atomic_load(&e->done)) {
    e->time = t;
    e->err = err;
    tl__strlcpy(e->detail, err ? detail : "", sizeof e->detail);
    atomic_store_explicit(&e->done, seq, memory_order_release);
    size_t k = 0;
    for (size_t i = 0; i < e->nwaiters; i++) {
      if (e->waiters[i].seq <= seq) tl__work_push(w, e->waiters[i].s);
      else e->waiters[k++] = e->waiters[i];
    }
    e->nwaiters = k;
    pthread_cond_broadcast(&e->cv);
  }
  pthread_mutex_unlock(&e->mu);
}

/* A record reached the head of s (s->mu held): the event completes, carrying a lost device's
 * error, or the stream's unreported error if no earlier event carried it yet. */
static void tl__record_done(sim_stream* s, sim_event* e, uint64_t seq, uint64_t t, worklist* w) {
  sim_dev* d = s->d;
  if (atomic_load_explicit(&d->lost, memory_order_acquire)) {
    char why[300];
    snprintf(why, sizeof why, "sim:%d is lost: %.200s", d->index, d->lost_detail);
    tl__event_complete(e, seq, t, TL__SIM_DEVICE_LOST, why, w);
    return;
  }
  int carry = s->err && !s->err_evented;
  s->err_evented |= carry;
  tl__event_complete(e, seq, t, carry ? s->err : 0, s->detail, w);
}

static void tl__engine_push(sim_engine* g, sim_op* op) {
  int pr = op->s->prio;
  op->qnext = NULL;
  pthread_mutex_lock(&g->mu);
  if (g->qt[pr]) g->qt[pr]->qnext = op;
  else g->qh[pr] = op;
  g->qt[pr] = op;
  pthread_cond_signal(&g->cv);
  pthread_mutex_unlock(&g->mu);
}

static sim_engine* tl__engine_of(sim_op* op) {
  sim_dev* d = op->s->d;
  switch (op->type) {
    case OP_HOSTFN: return &d->eng[ENG_HOST];
    case OP_COPY:
      return op->kind == TL__COPY_H2D ? &d->eng[ENG_H2D]
           : op->kind == TL__COPY_D2H ? &d->eng[ENG_D2H] : &d->eng[ENG_COMPUTE];
    default: return &d->eng[ENG_COMPUTE];
  }
}

static void tl__op_recycle(sim_stream* s, sim_op* op) {
  if (op->ev) tl__event_unref(op->ev);
  op->ev = NULL;
  op->next = s->spare;
  s->spare = op;
}

/* Moves s forward while its head can be resolved here (records, satisfied waits), and hands
 * the first engine operation to its engine. Called with s->mu held and s not busy. */
static void tl__advance(sim_stream* s, worklist* w) {
  for (;;) {
    sim_op* op = s->head;
    if (!op) {
      pthread_cond_broadcast(&s->idle);
      return;
    }
    if (op->type == OP_RECORD) {
      uint64_t t = s->last_end > op->submit ? s->last_end : op->submit;
      tl__record_done(s, op->ev, op->seq, t, w);
    } else if (op->type == OP_WAIT) {
      sim_event* e = op->ev;
      pthread_mutex_lock(&e->mu);
      if (atomic_load(&e->done) < op->seq) {
        if (e->nwaiters == e->capwaiters) {
          size_t cap = e->capwaiters ? 2 * e->capwaiters : 4;
          sim_waiter* v = realloc(e->waiters, cap * sizeof *v);
          if (!v) abort();
          e->waiters = v;
          e->capwaiters = cap;
        }
        e->waiters[e->nwaiters++] = (sim_waiter){s, op->seq};
        pthread_mutex_unlock(&e->mu);
        s->busy = 1;
        return;
      }
      if (e->time > s->last_end) s->last_end = e->time;
      pthread_mutex_unlock(&e->mu);
    } else {
      op->ready = s->last_end > op->submit ? s->last_end : op->submit;
      s->busy = 1;
      tl__engine_push(tl__engine_of(op), op);
      return;
    }
    s->head = op->next;
    if (!s->head) s->tail = NULL;
    atomic_fetch_sub(&s->d->queued, 1);
    tl__op_recycle(s, op);
  }
}

/* Advances every stream of the work list (each under its own lock), until none is left. */
static void tl__drain(worklist* w) {
  while (w->n > 0) {
    sim_stream* s = w->v[--w->n];
    pthread_mutex_lock(&s->mu);
    if (s->busy && s->head && s->head->type == OP_WAIT) {
      s->busy = 0;
      tl__advance(s, w);
    }
    pthread_mutex_unlock(&s->mu);
  }
  free(w->v);
  w->v = NULL;
  w->cap = 0;
}

/* The engine finished the stream's head at modelled time `end`. */
static void tl__complete(sim_op* op, uint64_t end, int err, const char* why) {
  sim_stream* s = op->s;
  worklist w = {0};
  pthread_mutex_lock(&s->mu);
  if (err && !s->err) {
    s->err = err;
    tl__strlcpy(s->detail, why, sizeof s->detail);
  }
  if (end > s->last_end) s->last_end = end;
  s->head = op->next;
  if (!s->head) s->tail = NULL;
  atomic_fetch_sub(&s->d->queued, 1);
  tl__op_recycle(s, op);
  s->busy = 0;
  tl__advance(s, &w);
  pthread_mutex_unlock(&s->mu);
  tl__drain(&w);
}

static void* tl__engine_main(void* arg) {
  sim_engine* g = arg;
  sim_dev* d = g->d;
  char name[16];
  static const char* const names[ENG_N] = {"compute", "h2d", "d2h", "host"};
  snprintf(name, sizeof name, "sim%d-%s", d->index, names[g->which]);
  pthread_setname_np(pthread_self(), name);
  char why[256];
  for (;;) {
    pthread_mutex_lock(&g->mu);
    sim_op* op = NULL;
    for (;;) {
      for (int p = TL__SIM_PRIOS - 1; p >= 0 && !op; p--)
        if (g->qh[p]) {
          op = g->qh[p];
          g->qh[p] = op->qnext;
          if (!g->qh[p]) g->qt[p] = NULL;
        }
      if (op) break;
      pthread_cond_wait(&g->cv, &g->mu);
    }
    pthread_mutex_unlock(&g->mu);

    uint64_t start = op->ready > g->free_at ? op->ready : g->free_at;
    uint64_t dur = tl__duration(op);
    uint64_t end = start + dur;
    why[0] = '\0';
    int err = 0;
    if (op->type == OP_HOSTFN) {
      err = tl__execute(op, why, sizeof why);
      uint64_t t1 = tl__now();
      if (t1 > end) end = t1;
    } else {
      /* Move the bytes as late as the host allows: start the real copy one estimated copy
       * time (plus margin) before the modelled end, so a reader that does not wait for the
       * completion sees the old bytes and a source reused too early is what gets copied. */
      uint64_t bytes = op->type == OP_KERNEL ? 0 : op->n;
      uint64_t est = (uint64_t)((double)bytes * g->ns_per_byte * 1.5) + 20000;
      if (end > est) tl__sleep_until(end - est, 0);
      uint64_t t0 = tl__now();
      err = tl__execute(op, why, sizeof why);
      uint64_t t1 = tl__now();
      if (bytes >= 65536 && !err) /* learn the host's copy speed (EWMA) */
        g->ns_per_byte = 0.8 * g->ns_per_byte + 0.2 * (double)(t1 - t0) / (double)bytes;
      /* the host's real work took longer than the model: real time rules (a sleep's
       * overshoot before it does not count) */
      if (t1 - t0 > dur && t1 > end) end = t1;
    }
    if (err) end = start; /* a failed operation ends at once */
    tl__sleep_until(end, tl__sim.cfg.spin_ns);
    uint64_t late = tl__now() - end;
    g->free_at = end;
    atomic_fetch_add_explicit(&g->busy_ns, end - start, memory_order_relaxed);
    atomic_fetch_add_explicit(&g->ops, 1, memory_order_relaxed);
    if (op->type == OP_COPY && !err)
      atomic_fetch_add_explicit(&g->bytes, op->n, memory_order_relaxed);
    atomic_fetch_add_explicit(&g->late_ns, late, memory_order_relaxed);
    uint64_t m = atomic_load_explicit(&g->late_max, memory_order_relaxed);
    while (late > m && !atomic_compare_exchange_weak(&g->late_max, &m, late)) {
    }
    tl__complete(op, end, err, why);
  }
  return NULL;
}

// ---------------------------------------------------------------------------------------------
// The table: devices, streams, events
// ---------------------------------------------------------------------------------------------

static int tl__sim_device_count(int* n) {
  *n = 0;
  if (!atomic_load(&tl__sim.configured))
    return tl__sim_fail(TL__SIM_NOT_CONFIGURED, "no sim devices are configured");
  *n = tl__sim.cfg.count;
  return 0;
}

static int tl__sim_device_info(int dev, tl_gpu_info_t* out) {
  if (!tl__sim_dev(dev)) return tl__sim_fail(TL__CUDA_INVALID_DEVICE, "no sim:%d", dev);
  memset(out, 0, sizeof *out);
  out->index = dev;
  snprintf(out->name, sizeof out->name, "threadloom sim device %d", dev);
  out->total_mem = tl__sim.cfg.mem;
  out->cc_major = 9;
  out->cc_minor = 0;
  out->sm_count = 1;
  return 0;
}

static int tl__sim_device_open(int dev) {
  sim_dev* d = tl__sim_dev(dev);
  if (!d) return tl__sim_fail(TL__CUDA_INVALID_DEVICE, "no sim:%d", dev);
  pthread_mutex_lock(&d->mu);
  int rc = 0;
  if (!atomic_load(&d->opened)) {
    d->t0 = tl__now();
    for (int e = 0; e < ENG_N && !tl__sim.cfg.zero_cost; e++) {
      d->eng[e].free_at = d->t0;
      d->eng[e].ns_per_byte = 0.1; /* 10 GB/s until measured */
      pthread_t t;
      pthread_attr_t at;
      pthread_attr_init(&at);
      pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
      int r = pthread_create(&t, &at, tl__engine_main, &d->eng[e]);
      pthread_attr_destroy(&at);
      if (r) {
        rc = tl__sim_fail(TL__CUDA_MEMORY_ALLOCATION, "sim:%d: pthread_create: %s", dev,
                          strerror(r));
        break;
      }
    }
    if (!rc) atomic_store(&d->opened, 1);
  }
  pthread_mutex_unlock(&d->mu);
  return rc;
}

static int tl__sim_priority_range(int dev, int* least, int* greatest) {
  (void)dev;
  *least = 0;
  *greatest = -(TL__SIM_PRIOS - 1);
  return 0;
}

static int tl__sim_stream_create(int dev, int priority, void** out) {
  sim_dev* d = tl__sim_dev(dev);
  if (!d) return tl__sim_fail(TL__CUDA_INVALID_DEVICE, "no sim:%d", dev);
  int rc = tl__lost(d);
  if (rc) return rc;
  sim_stream* s = calloc(1, sizeof *s);
  if (!s) return tl__sim_fail(TL__CUDA_MEMORY_ALLOCATION, "a stream");
  s->d = d;
  int p = -priority;
  s->prio = p < 0 ? 0 : p >= TL__SIM_PRIOS ? TL__SIM_PRIOS - 1 : p;
  pthread_mutex_init(&s->mu, NULL);
  pthread_cond_init(&s->idle, NULL);
  *out = s;
  return 0;
}

static int tl__sim_stream_synchronize(void* sp);

static int tl__sim_stream_destroy(void* sp) {
  sim_stream* s = sp;
  tl__sim_stream_synchronize(s);
  pthread_mutex_lock(&s->mu); /* the last completion may still hold it */
  pthread_mutex_unlock(&s->mu);
  for (sim_op* op = s->spare; op;) {
    sim_op* next = op->next;
    free(op);
    op = next;
  }
  pthread_mutex_destroy(&s->mu);
  pthread_cond_destroy(&s->idle);
  free(s);
  return 0;
}

/* Reports and clears the stream's latched error (s->mu held). */
static int tl__take_error(sim_stream* s) {
  int err = s->err;
  if (err) {
    tl__sim_fail(err, "%s", s->detail);
    s->err = 0;
    s->err_evented = 0;
    s->detail[0] = '\0';
  }
  return err;
}

static int tl__sim_stream_query(void* sp) {
  sim_stream* s = sp;
  pthread_mutex_lock(&s->mu);
  int rc = s->head ? TL__CUDA_NOT_READY : tl__take_error(s);
  pthread_mutex_unlock(&s->mu);
  return rc;
}

static int tl__sim_stream_synchronize(void* sp) {
  sim_stream* s = sp;
  pthread_mutex_lock(&s->mu);
  while (s->head) pthread_cond_wait(&s->idle, &s->mu);
  int rc = tl__take_error(s);
  pthread_mutex_unlock(&s->mu);
  return rc;
}

static void* tl__sim_stream_handle(void* s) { return s; }


/* Queues op on s (or runs it at once with cost=0). Takes ownership of op's event reference. */
static int tl__submit(sim_stream* s, sim_op* proto) {
  sim_dev* d = s->d;
  int rc = tl__lost(d);
  if (rc) {
    if (proto->ev) tl__event_unref(proto->ev);
    return rc;
  }
  if (tl__sim.cfg.launch_iters && proto->type <= OP_KERNEL) tl__spend_cpu(tl__sim.cfg.launch_iters);
  if (tl__sim.cfg.zero_cost) {
    char why[256] = "";
    worklist w = {0};
    proto->s = s;
    switch (proto->type) {
      case OP_RECORD:
        pthread_mutex_lock(&s->mu);
        tl__record_done(s, proto->ev, proto->seq, tl__now(), &w);
        pthread_mutex_unlock(&s->mu);
        break;
      case OP_WAIT: break; /* every record completed when it was made */
      default: {
        int err = tl__execute(proto, why, sizeof why);
        if (err) {
          pthread_mutex_lock(&s->mu);
          if (!s->err) {
            s->err = err;
            tl__strlcpy(s->detail, why, sizeof s->detail);
          }
          pthread_mutex_unlock(&s->mu);
        }
      }
    }
    if (proto->ev) tl__event_unref(proto->ev);
    free(w.v);
    return 0;
  }
  pthread_mutex_lock(&s->mu);
  sim_op* op = s->spare;
  if (op) s->spare = op->next;
  else if (!(op = malloc(sizeof *op))) {
    pthread_mutex_unlock(&s->mu);
    if (proto->ev) tl__event_unref(proto->ev);
    return tl__sim_fail(TL__CUDA_MEMORY_ALLOCATION, "an operation record");
  }
  *op = *proto;
  op->s = s;
  op->next = NULL;
  op->submit = tl__now();
  if (s->tail) s->tail->next = op;
  else s->head = op;
  s->tail = op;
  atomic_fetch_add(&d->queued, 1);
  worklist w = {0};
  if (!s->busy) tl__advance(s, &w);
  pthread_mutex_unlock(&s->mu);
  tl__drain(&w);
  return 0;
}

static int tl__sim_stream_wait_event(void* sp, void* ep) {
  sim_event* e = ep;
  uint64_t seq = atomic_load(&e->rec);
  if (seq == 0) return 0; /* never recorded: nothing to wait for */
  atomic_fetch_add(&e->refs, 1);
  sim_op op = {.type = OP_WAIT, .ev = e, .seq = seq};
  return tl__submit(sp, &op);
}

/* Another library's stream on a sim device: only handles the sim gave out exist. */
static int tl__sim_foreign_wait_event(int dev, void* raw, void* ep) {
  sim_dev* d = tl__sim_dev(dev);
  if (!d || !raw) return tl__sim_fail(TL__CUDA_INVALID_VALUE, "stream handle %p on sim:%d", raw, dev);
  if ((uintptr_t)raw <= 2) return 0; /* a CUDA default stream: there is none on sim */
  return tl__sim_stream_wait_event(raw, ep);
}

static int tl__sim_event_record(void* ep, void* sp);

/* A record on another library's stream: as the wait, only handles the sim gave out exist; on a
 * CUDA default stream (none on sim) the event is left as it is (complete). */
static int tl__sim_foreign_event_record(int dev, void* raw, void* ep) {
  sim_dev* d = tl__sim_dev(dev);
  if (!d || !raw)
    return tl__sim_fail(TL__CUDA_INVALID_VALUE, "stream handle %p on sim:%d", raw, dev);
  if ((uintptr_t)raw <= 2) return 0;
  return tl__sim_event_record(ep, raw);
}

static int tl__sim_launch_host_func(void* sp, void (*fn)(void*), void* arg) {
  sim_op op = {.type = OP_HOSTFN, .fn = fn, .arg = arg};
  return tl__submit(sp, &op);
}

static int tl__sim_event_create(int dev, int timing, void** out) {
  sim_dev* d = tl__sim_dev(dev);
  if (!d) return tl__sim_fail(TL__CUDA_INVALID_DEVICE, "no sim:%d", dev);
  int rc = tl__lost(d);
  if (rc) return rc;
  sim_event* e = calloc(1, sizeof *e);
  if (!e) return tl__sim_fail(TL__CUDA_MEMORY_ALLOCATION, "an event");
  e->d = d;
  e->timing = timing;
  pthread_mutex_init(&e->mu, NULL);
  pthread_cond_init(&e->cv, NULL);
  atomic_init(&e->refs, 1);
  *out = e;
  return 0;
}

static int tl__sim_event_destroy(void* ep) {
  tl__event_unref(ep);
  return 0;
}

static int tl__sim_event_record(void* ep, void* sp) {
  sim_event* e = ep;
  sim_stream* s = sp;
  if (e->d != s->d)
    return tl__sim_fail(TL__CUDA_INVALID_VALUE, "event of sim:%d recorded on a stream of sim:%d",
                        e->d->index, s->d->index);
  atomic_fetch_add(&e->refs, 1);
  sim_op op = {.type = OP_RECORD, .ev = e};
  /* The record number is taken under the stream's lock in submit order only with cost=1; two
   * threads recording one event at once is a race in CUDA too. */
  op.seq = atomic_fetch_add(&e->rec, 1) + 1;
  int rc = tl__submit(s, &op);
  if (rc) {
    /* nothing will complete this record: complete it here so no waiter hangs */
    worklist w = {0};
    tl__event_complete(e, op.seq, tl__now(), rc, tl__sim_detail, &w);
    tl__drain(&w);
  }
  return rc;
}

static int tl__sim_event_query(void* ep) {
  sim_event* e = ep;
  if (atomic_load_explicit(&e->done, memory_order_acquire) < atomic_load(&e->rec))
    return TL__CUDA_NOT_READY;
  pthread_mutex_lock(&e->mu);
  int err = e->err;
  if (err) tl__sim_fail(err, "%s", e->detail);
  pthread_mutex_unlock(&e->mu);
  return err;
}

static int tl__sim_event_synchronize(void* ep) {
  sim_event* e = ep;
  uint64_t target = atomic_load(&e->rec);
  pthread_mutex_lock(&e->mu);
  while (atomic_load(&e->done) < target) pthread_cond_wait(&e->cv, &e->mu);
  int err = e->err;
  if (err) tl__sim_fail(err, "%s", e->detail);
  pthread_mutex_unlock(&e->mu);
  return err;
}

static int tl__sim_event_elapsed(float* ms, void* a, void* b) {
  sim_event* x = a;
  sim_event* y = b;
  if (!x->timing || !y->timing)
    return tl__sim_fail(TL__CUDA_INVALID_VALUE, "elapsed time of an event without timing");
  if (atomic_load(&x->done) < atomic_load(&x->rec) || atomic_load(&y->done) < atomic_load(&y->rec))
    return TL__CUDA_NOT_READY;
  if (atomic_load(&x->rec) == 0 || atomic_load(&y->rec) == 0)
    return tl__sim_fail(TL__CUDA_INVALID_VALUE, "elapsed time of an event never recorded");
  pthread_mutex_lock(&x->mu);
  uint64_t tx = x->time;
  pthread_mutex_unlock(&x->mu);
  pthread_mutex_lock(&y->mu);
  uint64_t ty = y->time;
  pthread_mutex_unlock(&y->mu);
  *ms = (float)(((double)ty - (double)tx) / 1e6);
  return 0;
}

static int tl__sim_memcpy_async(void* dst, const void* src, size_t n, int kind, void* sp) {
  if (kind != TL__COPY_H2D && kind != TL__COPY_D2H && kind != TL__COPY_D2D)
    return tl__sim_fail(TL__CUDA_INVALID_VALUE, "copy kind %d", kind);
  sim_dev* d = ((sim_stream*)sp)->d;
  int left = atomic_load(&d->copy_fail_left);
  while (left > 0 && !atomic_compare_exchange_weak(&d->copy_fail_left, &left, left - 1)) {
  }
  if (left > 0)
    return tl__sim_fail(TL__SIM_COPY_FAILED, "sim:%d: injected copy failure (%zu bytes, %s)",
                        d->index, n, kind == TL__COPY_H2D ? "H2D" : kind == TL__COPY_D2H ? "D2H" : "D2D");
  sim_op op = {.type = OP_COPY, .dst = dst, .src = src, .n = n, .kind = kind};
  return tl__submit(sp, &op);
}

static int tl__sim_memset_async(void* p, int value, size_t n, void* sp) {
  sim_op op = {.type = OP_MEMSET, .dst = p, .n = n, .value = value};
  return tl__submit(sp, &op);
}

static int tl__sim_kernel_async(void* sp, uint64_t ns) {
  sim_stream* s = sp;
  if (tl__sim.cfg.zero_cost) { /* nothing to run, nothing to wait for */
    if (tl__sim.cfg.launch_iters) tl__spend_cpu(tl__sim.cfg.launch_iters);
    return tl__lost(s->d);
  }
  sim_op op = {.type = OP_KERNEL, .ns = ns};
  return tl__submit(s, &op);
}

static int tl__sim_last_error(void) { return 0; }

static int tl__sim_version(int* v) {
  *v = 0;
  return 0;
}

static int tl__sim_set_device(int dev) {
  return tl__sim_dev(dev) ? 0 : tl__sim_fail(TL__CUDA_INVALID_DEVICE, "no sim:%d", dev);
}

static const char* tl__sim_error_name(int code) {
  switch (code) {
    case TL__SIM_DEVICE_LOST: return "simErrorDeviceLost";
    case TL__SIM_COPY_FAILED: return "simErrorCopyFailed";
    case TL__SIM_NOT_CONFIGURED: return "simErrorNotConfigured";
    case TL__CUDA_INVALID_VALUE: return "cudaErrorInvalidValue";
    case TL__CUDA_MEMORY_ALLOCATION: return "cudaErrorMemoryAllocation";
    case TL__CUDA_INVALID_DEVICE: return "cudaErrorInvalidDevice";
    case TL__CUDA_NOT_READY: return "cudaErrorNotReady";
    case TL__CUDA_HOST_MEMORY_ALREADY_REGISTERED: return "cudaErrorHostMemoryAlreadyRegistered";
    case TL__CUDA_HOST_MEMORY_NOT_REGISTERED: return "cudaErrorHostMemoryNotRegistered";
    default: return "simErrorUnknown";
  }
}

static const char* tl__sim_error_string(int code) {
  switch (code) {
    case TL__SIM_DEVICE_LOST: return "the simulated device is lost";
    case TL__SIM_COPY_FAILED: return "the copy was refused (fault injection)";
    case TL__SIM_NOT_CONFIGURED:
      return "no sim devices: set THREADLOOM_DEVICES=sim:N or call tl_devices_select(\"sim:N\")";
    case TL__CUDA_MEMORY_ALLOCATION: return "out of memory";
    case TL__CUDA_NOT_READY: return "device not ready";
    default: return "sim device error";
  }
}

const tl__dev_api_t tl__sim_api = {
    .name = "sim",
    .kind = TL_DEVICE_SIM,
    .runtime_version = tl__sim_version,
    .driver_version = tl__sim_version,
    .device_count = tl__sim_device_count,
    .device_info = tl__sim_device_info,
    .error_name = tl__sim_error_name,
    .error_string = tl__sim_error_string,
    .host_register = tl__sim_host_register,
    .host_unregister = tl__sim_host_unregister,
    .set_device = tl__sim_set_device,
    .device_open = tl__sim_device_open,
    .mem_info = tl__sim_mem_info,
    .priority_range = tl__sim_priority_range,
    .stream_create = tl__sim_stream_create,
    .stream_destroy = tl__sim_stream_destroy,
    .stream_query = tl__sim_stream_query,
    .stream_synchronize = tl__sim_stream_synchronize,
    .stream_wait_event = tl__sim_stream_wait_event,
    .stream_handle = tl__sim_stream_handle,
    .foreign_wait_event = tl__sim_foreign_wait_event,
    .foreign_event_record = tl__sim_foreign_event_record,
    .launch_host_func = tl__sim_launch_host_func,
    .event_create = tl__sim_event_create,
    .event_destroy = tl__sim_event_destroy,
    .event_record = tl__sim_event_record,
    .event_query = tl__sim_event_query,
    .event_synchronize = tl__sim_event_synchronize,
    .event_elapsed = tl__sim_event_elapsed,
    .mem_alloc = tl__sim_mem_alloc,
    .mem_free = tl__sim_mem_free,
    .memcpy_async = tl__sim_memcpy_async,
    .memset_async = tl__sim_memset_async,
    .kernel_async = tl__sim_kernel_async,
    .last_error = tl__sim_last_error,
    .last_detail = tl__sim_last_detail,
};

// ---------------------------------------------------------------------------------------------
// Public sim controls (statistics, live settings, faults)
// ---------------------------------------------------------------------------------------------

int tl__sim_stats(int dev, int engine, tl_engine_stats_t* out) {
  sim_dev* d = tl__sim_dev(dev);
  if (!d || engine < 0 || engine >= TL_ENGINE_COUNT)
    return tl__fail(TL_EINVAL, "tl_sim_engine_stats: no sim:%d engine %d", dev, engine);
  sim_engine* g = &d->eng[engine];
  out->busy_ns = atomic_load(&g->busy_ns);
  out->ops = atomic_load(&g->ops);
  out->bytes = atomic_load(&g->bytes);
  out->late_ns = atomic_load(&g->late_ns);
  out->late_max_ns = atomic_load(&g->late_max);
  out->wall_ns = atomic_load(&d->opened) ? tl__now() - d->t0 : 0;
  return 0;
}

int tl__sim_set(int dev, const char* options) {
  sim_dev* d = tl__sim_dev(dev);
  if (!d) return tl__fail(TL_EINVAL, "tl_sim_set: no sim:%d", dev);
  if (!options) return tl__fail(TL_EINVAL, "tl_sim_set: NULL options");
  sim_cfg c = tl__sim.cfg;
  c.h2d = atomic_load(&d->bw[0]);
  c.d2h = atomic_load(&d->bw[1]);
  c.pageable = atomic_load(&d->bw[2]);
  c.d2d = atomic_load(&d->bw[3]);
  int err = tl__sim_options(&c, options, 1);
  if (err) return err;
  atomic_store(&d->bw[0], c.h2d);
  atomic_store(&d->bw[1], c.d2h);
  atomic_store(&d->bw[2], c.pageable);
  atomic_store(&d->bw[3], c.d2d);
  return 0;
}

int tl__sim_inject(int dev, int fault, int count) {
  sim_dev* d = tl__sim_dev(dev);
  if (!d) return tl__fail(TL_EINVAL, "tl_sim_inject: no sim:%d", dev);
  switch (fault) {
    case TL_SIM_FAULT_OOM: atomic_store(&d->oom_left, count); return 0;
    case TL_SIM_FAULT_COPY: atomic_store(&d->copy_fail_left, count); return 0;
    case TL_SIM_FAULT_LOST: tl__lose(d, "injected device loss (tl_sim_inject)"); return 0;
  }
  return tl__fail(TL_EINVAL, "tl_sim_inject: fault %d is not a tl_sim_fault_t", fault);
}

int tl__sim_recover(int dev) {
  sim_dev* d = tl__sim_dev(dev);
  if (!d) return tl__fail(TL_EINVAL, "tl_sim_recover: no sim:%d", dev);
  uint64_t deadline = tl__now() + 10000000000ull;
  while (atomic_load(&d->queued) > 0) {
    if (tl__now() > deadline)
      return tl__fail(TL_ETIMEDOUT, "tl_sim_recover: sim:%d still has %ld operations queued "
                      "after 10 s", dev, atomic_load(&d->queued));
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
  }
  atomic_store(&d->oom_left, 0);
  atomic_store(&d->copy_fail_left, 0);
  pthread_mutex_lock(&d->mu);
  d->lost_detail[0] = '\0';
  atomic_store(&d->lost, 0);
  pthread_mutex_unlock(&d->mu);
  return 0;
}
