/* tests/c/test-device.c: devices, streams, events, copies, the caching allocator and staging
 * (cudactx/registry.c, stream.c, dalloc.c, staging.c) on simulated devices, and the same
 * bodies on a real GPU (the gpu_device_* tests, which SKIP without one, saying why).
 *
 * Sim-only tests slow the sim's engines to make orderings and races observable, and inject
 * faults. Each test runs in its own forked child, so each selects its own backend. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cudactx/internal.h"
#include "task.h"
#include "threadloom/threadloom.h"

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define SCALE 4 /* stress loops run 1/SCALE as many rounds under the sanitizers */
#else
#define SCALE 1
#endif

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Selects `spec` and returns sim device `index`. */
static tl_device_t* sim_device(const char* spec, int index) {
  unsetenv("THREADLOOM_DEVICES");
  ASSERT_OK(tl_devices_select(spec));
  tl_device_t* d = NULL;
  ASSERT_OK(tl_device_get(TL_DEVICE_SIM, index, &d));
  return d;
}

/* cuda:0, or NULL after printing why there is none. */
static tl_device_t* cuda_device(void) {
  tl_device_t* d = NULL;
  int err = tl_device_get(TL_DEVICE_CUDA, 0, &d);
  if (err) {
    fprintf(stderr, "skip: no usable GPU: %s (%s)\n", tl_err_name(err), tl_err_detail());
    return NULL;
  }
  return d;
}

/* One body, two tests: device_NAME on sim (spec), gpu_device_NAME on cuda:0 (skips without). */
#define DEVICE_TEST(name, spec)                                 \
  static int name##_body(tl_device_t* d);                       \
  TEST_IMPL(device_##name) { return name##_body(sim_device(spec, 0)); } \
  TEST_IMPL(gpu_device_##name) {                                \
    tl_device_t* d = cuda_device();                             \
    return d ? name##_body(d) : TEST_SKIP;                      \
  }                                                             \
  static int name##_body(tl_device_t* d)

static void fill_random(unsigned char* p, size_t n, uint64_t seed) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    p[i] = (unsigned char)x;
  }
}

/* A page-locked host buffer of n bytes from a staging pool of one slot (through the device's
 * backend), for pinned copies. */
typedef struct {
  tl_staging_t* pool;
  tl_staging_slot_t* slot;
} pinned_t;

static unsigned char* pinned_new(pinned_t* p, tl_device_t* d, size_t n) {
  tl_staging_options_t o = {.device = d, .slot_bytes = n, .slots = 1, .numa_node = -1};
  ASSERT_OK(tl_staging_init(&p->pool, &o));
  ASSERT_OK(tl_staging_acquire(p->pool, 1000, &p->slot));
  return p->slot->ptr;
}

static void pinned_free(pinned_t* p) {
  ASSERT_OK(tl_staging_release(p->slot, NULL));
  ASSERT_OK(tl_staging_close(p->pool));
}

// ---------------------------------------------------------------------------------------------
// Selection
// ---------------------------------------------------------------------------------------------

TEST_IMPL(device_select_and_backend) {
  unsetenv("THREADLOOM_DEVICES");
  ASSERT_EQ(tl_devices_select("gpu"), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "use cuda, none or sim:N");
  ASSERT_EQ(tl_devices_select("sim"), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "needs a device count");
  ASSERT_EQ(tl_devices_select("sim:0"), TL_EINVAL);
  ASSERT_EQ(tl_devices_select("sim:65"), TL_EINVAL);
  ASSERT_EQ(tl_devices_select("sim:2,h2d=fast"), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "h2d=fast: give a bandwidth like 25GB/s");
  ASSERT_EQ(tl_devices_select("sim:2,colour=red"), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "unknown sim option 'colour'");
  ASSERT_EQ(tl_devices_select("sim:2,mem=12"), TL_EINVAL);
  ASSERT_OK(tl_devices_select("sim:3,h2d=25GB/s,mem=1GiB"));
  ASSERT_OK(tl_devices_select("sim:3,h2d=25GB/s,mem=1GiB")); /* the same again */
  ASSERT_EQ(tl_devices_select("cuda"), TL_EBUSY);
  ASSERT_CONTAINS(tl_err_detail(), "before first use");
  tl_devices_info_t info;
  ASSERT_OK(tl_devices_backend(&info));
  ASSERT_EQ(info.kind, TL_DEVICE_SIM);
  ASSERT_STR_EQ(info.name, "sim");
  ASSERT_EQ(info.count, 3);
  ASSERT_CONTAINS(info.why, "tl_devices_select(\"sim:3,h2d=25GB/s,mem=1GiB\")");
  int n;
  ASSERT_OK(tl_device_count(TL_DEVICE_DEFAULT, &n));
  ASSERT_EQ(n, 3);
  tl_device_t *d0, *d2, *again;
  ASSERT_OK(tl_device_get(TL_DEVICE_DEFAULT, 0, &d0));
  ASSERT_OK(tl_device_get(TL_DEVICE_SIM, 2, &d2));
  ASSERT_OK(tl_device_get(TL_DEVICE_SIM, 2, &again));
  ASSERT(d2 == again);
  ASSERT_STR_EQ(tl_device_name(d2), "sim:2");
  ASSERT_EQ(tl_device_get(TL_DEVICE_SIM, 3, &again), TL_ENODEV);
  ASSERT_CONTAINS(tl_err_detail(), "3 sim device(s) exist");
  tl_device_props_t p;
  ASSERT_OK(tl_device_props(d2, &p));
  ASSERT_EQ(p.kind, TL_DEVICE_SIM);
  ASSERT_EQ(p.index, 2);
  ASSERT_EQ(p.total_mem, (size_t)1 << 30);
  ASSERT_CONTAINS(p.name, "sim device 2");
  ASSERT_EQ(p.priority_least, 0);
  ASSERT(p.priority_greatest < 0);
  if (p.numa_node >= 0) ASSERT(p.local_cpus[0] != '\0');
  size_t fr, tot;
  ASSERT_OK(tl_device_mem_info(d0, &fr, &tot));
  ASSERT_EQ(tot, (size_t)1 << 30);
  ASSERT_EQ(fr, tot);
  return 0;
}

TEST_IMPL(device_select_from_environment) {
  setenv("THREADLOOM_DEVICES", "sim:2,cost=0", 1);
  tl_devices_info_t info;
  ASSERT_OK(tl_devices_backend(&info));
  ASSERT_EQ(info.kind, TL_DEVICE_SIM);
  ASSERT_EQ(info.count, 2);
  ASSERT_STR_EQ(info.why, "THREADLOOM_DEVICES=sim:2,cost=0");
  ASSERT_OK(tl_devices_select("sim:2,cost=0"));
  ASSERT_EQ(tl_devices_select("none"), TL_EBUSY);
  return 0;
}

TEST_IMPL(device_select_bad_environment) {
  setenv("THREADLOOM_DEVICES", "sim:two", 1);
  tl_devices_info_t info;
  ASSERT_EQ(tl_devices_backend(&info), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "THREADLOOM_DEVICES=sim:two");
  ASSERT_CONTAINS(tl_err_detail(), "must be 1..64");
  tl_device_t* d;
  ASSERT_EQ(tl_device_get(TL_DEVICE_DEFAULT, 0, &d), TL_EINVAL);
  return 0;
}

TEST_IMPL(device_default_without_gpu) {
  unsetenv("THREADLOOM_DEVICES");
  int n;
  if (tl_cuda_device_count(&n) == 0) SKIP("this machine has %d GPU(s): the default is cuda", n);
  tl_devices_info_t info;
  ASSERT_OK(tl_devices_backend(&info));
  ASSERT_EQ(info.kind, TL_DEVICE_NONE);
  ASSERT_EQ(info.count, 0);
  ASSERT_CONTAINS(info.why, "default: no usable GPU");
  ASSERT_CONTAINS(info.why, "THREADLOOM_DEVICES=sim:N");
  tl_device_t* d;
  ASSERT_EQ(tl_device_get(TL_DEVICE_DEFAULT, 0, &d), TL_ENODEV);
  ASSERT_CONTAINS(tl_err_detail(), "backend is none");
  ASSERT_EQ(tl_device_get(TL_DEVICE_SIM, 0, &d), TL_ENODEV);
  ASSERT_CONTAINS(tl_err_detail(), "THREADLOOM_DEVICES=sim:N");
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Copies, ordering, events
// ---------------------------------------------------------------------------------------------

DEVICE_TEST(copies_byte_for_byte, "sim:1") {
  tl_stream_t* s;
  ASSERT_OK(tl_stream_acquire(d, 0, &s));
  static const size_t sizes[] = {1, 7, 4096, MiB + 13, 8 * MiB};
  pinned_t pin;
  unsigned char* host_pinned = pinned_new(&pin, d, 8 * MiB);
  for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
    size_t n = sizes[k];
    unsigned char* src = malloc(n);
    unsigned char* back = malloc(n);
    ASSERT(src && back);
    fill_random(src, n, 100 + k);
    fill_random(host_pinned, n, 200 + k);
    memset(back, 0, n);
    tl_dbuf_t *a, *b;
    ASSERT_OK(tl_dbuf_alloc(s, n, &a));
    ASSERT_OK(tl_dbuf_alloc(s, n, &b));
    /* pageable H2D, D2D, pinned D2H; then pinned H2D, pageable D2H */
    ASSERT_OK(tl_copy_async(s, a->ptr, src, n, TL_COPY_H2D));
    ASSERT_OK(tl_copy_async(s, b->ptr, a->ptr, n, TL_COPY_D2D));
    ASSERT_OK(tl_copy_async(s, host_pinned, b->ptr, n, TL_COPY_D2H));
    ASSERT_OK(tl_stream_sync(s, 10000));
    ASSERT(memcmp(host_pinned, src, n) == 0);
    fill_random(host_pinned, n, 300 + k);
    ASSERT_OK(tl_copy_async(s, a->ptr, host_pinned, n, TL_COPY_H2D));
    ASSERT_OK(tl_copy_async(s, back, a->ptr, n, TL_COPY_D2H));
    ASSERT_OK(tl_stream_sync(s, 10000));
    ASSERT(memcmp(back, host_pinned, n) == 0);
    /* memset */
    ASSERT_OK(tl_memset_async(s, b->ptr, 0xA5, n));
    ASSERT_OK(tl_copy_async(s, back, b->ptr, n, TL_COPY_D2H));
    ASSERT_OK(tl_stream_sync(s, 10000));
    for (size_t i = 0; i < n; i++) ASSERT_EQ(back[i], 0xA5);
    ASSERT_OK(tl_dbuf_free(a));
    ASSERT_OK(tl_dbuf_free(b));
    free(src);
    free(back);
  }
  ASSERT_EQ(tl_copy_async(s, NULL, host_pinned, 1, TL_COPY_H2D), TL_EINVAL);
  ASSERT_EQ(tl_copy_async(s, host_pinned, host_pinned, 1, (tl_copy_kind_t)9), TL_EINVAL);
  ASSERT_OK(tl_copy_async(s, NULL, NULL, 0, TL_COPY_H2D)); /* nothing to do */
  pinned_free(&pin);
  tl_stream_release(s);
  return 0;
}

/* Stream b reads what stream a wrote only because b waits for a's event: a's copy comes after
 * a 20 ms kernel, so without the wait b would copy the device buffer's fresh-allocation fill
 * (0xCD on sim) instead. */
DEVICE_TEST(ordering_across_streams, "sim:1") {
  tl_stream_t *a, *b;
  ASSERT_OK(tl_stream_acquire(d, 0, &a));
  ASSERT_OK(tl_stream_acquire(d, 0, &b));
  ASSERT(a != b);
  size_t n = MiB;
  unsigned char* src = malloc(n);
  unsigned char* dst = malloc(n);
  fill_random(src, n, 7);
  memset(dst, 0, n);
  tl_dbuf_t* buf;
  ASSERT_OK(tl_dbuf_alloc(a, n, &buf));
  ASSERT_OK(tl_dbuf_record_stream(buf, b));
  tl_event_t *e, *t0, *t1;
  ASSERT_OK(tl_event_init(d, 0, &e));
  ASSERT_OK(tl_event_init(d, TL_EVENT_TIMING, &t0));
  ASSERT_OK(tl_event_init(d, TL_EVENT_TIMING, &t1));
  ASSERT_OK(tl_event_query(e)); /* never recorded: complete */
  ASSERT_OK(tl_kernel_async(a, 20000000));
  ASSERT_OK(tl_copy_async(a, buf->ptr, src, n, TL_COPY_H2D));
  ASSERT_OK(tl_event_record(t0, a));
  ASSERT_OK(tl_kernel_async(a, 5000000)); /* 5 ms */
  ASSERT_OK(tl_event_record(t1, a));
  ASSERT_OK(tl_event_record(e, a));
  ASSERT_EQ(tl_event_query(e), TL_EAGAIN);
  ASSERT_OK(tl_stream_wait_event(b, e));
  ASSERT_OK(tl_copy_async(b, dst, buf->ptr, n, TL_COPY_D2H));
  ASSERT_OK(tl_stream_sync(b, 10000));
  ASSERT_OK(tl_event_query(e));
  ASSERT(memcmp(dst, src, n) == 0);
  double ms = 0;
  ASSERT_OK(tl_event_elapsed(t0, t1, &ms));
  if (d->kind == TL_DEVICE_SIM)
    ASSERT(ms > 4.999 && ms < 5.001); /* modelled time is exact */
  else
    ASSERT(ms >= 4.9); /* %globaltimer resolution */
  ASSERT_EQ(tl_event_elapsed(e, t1, &ms), TL_EINVAL); /* e has no timing */
  ASSERT_OK(tl_dbuf_free(buf));
  tl_event_close(e);
  tl_event_close(t0);
  tl_event_close(t1);
  tl_stream_release(a);
  tl_stream_release(b);
  free(src);
  free(dst);
  return 0;
}

/* The same without the wait: b's copy overtakes a's and reads the fill. This shows the test
 * above can fail. Then a slow copy without a wait: the sim moves the bytes at the end of the
 * copy's modelled time, so a reader that does not wait sees the old bytes, as on a GPU. */
TEST_IMPL(device_ordering_needs_the_wait) {
#if defined(__SANITIZE_THREAD__)
  SKIP("a deliberate race between the host and the engines, which ThreadSanitizer reports");
#endif
  tl_device_t* d = sim_device("sim:1,pageable=100MB/s", 0);
  tl_stream_t *a, *b;
  ASSERT_OK(tl_stream_acquire(d, 0, &a));
  ASSERT_OK(tl_stream_acquire(d, 0, &b));
  size_t n = MiB;
  unsigned char* src = malloc(n);
  unsigned char* dst = malloc(n);
  memset(src, 0x11, n);
  tl_dbuf_t* buf;
  ASSERT_OK(tl_dbuf_alloc(a, n, &buf));
  ASSERT_OK(tl_kernel_async(a, 20000000));
  ASSERT_OK(tl_copy_async(a, buf->ptr, src, n, TL_COPY_H2D));
  pinned_t pin;
  unsigned char* fast = pinned_new(&pin, d, n); /* pinned: b's D2H is fast */
  ASSERT_OK(tl_copy_async(b, fast, buf->ptr, n, TL_COPY_D2H));
  ASSERT_OK(tl_stream_sync(b, 10000));
  ASSERT_EQ(fast[0], 0xCD);
  ASSERT_OK(tl_stream_sync(a, 10000));
  /* a 10 ms pageable H2D of 0x22 bytes, read at once by b */
  memset(src, 0x22, n);
  ASSERT_OK(tl_copy_async(a, buf->ptr, src, n, TL_COPY_H2D));
  ASSERT_OK(tl_copy_async(b, fast, buf->ptr, n, TL_COPY_D2H));
  ASSERT_OK(tl_stream_sync(b, 10000));
  ASSERT_EQ(fast[0], 0x11);
  ASSERT_OK(tl_stream_sync(a, 10000));
  ASSERT_OK(tl_dbuf_free(buf));
  pinned_free(&pin);
  free(src);
  free(dst);
  return 0;
}

typedef struct {
  _Atomic int order[16];
  _Atomic int n;
} cb_log_t;

typedef struct {
  cb_log_t* log;
  int id;
} cb_arg_t;

static void cb_note(void* p) {
  cb_arg_t* a = p;
  int k = atomic_fetch_add(&a->log->n, 1);
  if (k < 16) atomic_store(&a->log->order[k], a->id);
}

DEVICE_TEST(callbacks_in_stream_order, "sim:1") {
  tl_stream_t* s;
  ASSERT_OK(tl_stream_acquire(d, 0, &s));
  cb_log_t log;
  memset(&log, 0, sizeof log);
  cb_arg_t args[4];
  for (int i = 0; i < 4; i++) {
    args[i] = (cb_arg_t){&log, i};
    ASSERT_OK(tl_kernel_async(s, 1000000));
    ASSERT_OK(tl_stream_callback(s, cb_note, &args[i]));
  }
  ASSERT_OK(tl_stream_sync(s, 10000));
  ASSERT_EQ(atomic_load(&log.n), 4);
  for (int i = 0; i < 4; i++) ASSERT_EQ(atomic_load(&log.order[i]), i);
  ASSERT_EQ(tl_stream_callback(s, NULL, NULL), TL_EINVAL);
  tl_stream_release(s);
  return 0;
}

/* The compute engine runs the more urgent stream's queued kernel first. */
TEST_IMPL(device_priorities) {
  tl_device_t* d = sim_device("sim:1", 0);
  tl_stream_t *busy, *lo, *hi;
  tl_device_props_t p;
  ASSERT_OK(tl_device_props(d, &p));
  ASSERT_OK(tl_stream_acquire(d, 0, &busy));
  ASSERT_OK(tl_stream_acquire(d, 0, &lo));
  ASSERT_OK(tl_stream_acquire(d, -100, &hi)); /* clamped to the greatest */
  ASSERT_EQ(tl_stream_priority(hi), p.priority_greatest);
  cb_log_t log;
  memset(&log, 0, sizeof log);
  cb_arg_t a_lo = {&log, 1}, a_hi = {&log, 2};
  ASSERT_OK(tl_kernel_async(busy, 20000000)); /* occupies the engine for 20 ms */
  ASSERT_OK(tl_kernel_async(lo, 1000));
  ASSERT_OK(tl_stream_callback(lo, cb_note, &a_lo));
  ASSERT_OK(tl_kernel_async(hi, 1000));
  ASSERT_OK(tl_stream_callback(hi, cb_note, &a_hi));
  ASSERT_OK(tl_device_sync(d));
  ASSERT_EQ(atomic_load(&log.n), 2);
  ASSERT_EQ(atomic_load(&log.order[0]), 2);
  ASSERT_EQ(atomic_load(&log.order[1]), 1);
  return 0;
}

TEST_IMPL(device_zero_cost) {
  tl_device_t* d = sim_device("sim:1,cost=0", 0);
  tl_stream_t* s;
  ASSERT_OK(tl_stream_acquire(d, 0, &s));
  tl_event_t* e;
  ASSERT_OK(tl_event_init(d, 0, &e));
  unsigned char src[4096], dst[4096];
  fill_random(src, sizeof src, 3);
  tl_dbuf_t* b;
  ASSERT_OK(tl_dbuf_alloc(s, sizeof src, &b));
  ASSERT_OK(tl_copy_async(s, b->ptr, src, sizeof src, TL_COPY_H2D));
  ASSERT_OK(tl_kernel_async(s, 1000000000)); /* a "second" that costs nothing */
  ASSERT_OK(tl_event_record(e, s));
  ASSERT_OK(tl_event_query(e)); /* complete at once */
  ASSERT_OK(tl_copy_async(s, dst, b->ptr, sizeof dst, TL_COPY_D2H));
  ASSERT(memcmp(src, dst, sizeof src) == 0);
  ASSERT_OK(tl_stream_query(s));
  tl_engine_stats_t st;
  ASSERT_OK(tl_sim_engine_stats(d, TL_ENGINE_COMPUTE, &st));
  ASSERT_EQ(st.busy_ns, 0);
  ASSERT_OK(tl_dbuf_free(b));
  tl_event_close(e);
  return 0;
}

/* launch=: each kernel, copy or memset submission costs its thread that much CPU time (records
 * and waits cost nothing); with cost=0 the device still keeps up at once. */
TEST_IMPL(device_sim_launch_cost) {
  unsetenv("THREADLOOM_DEVICES");
  ASSERT_EQ(tl_devices_select("sim:1,launch=1s"), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "at most 10ms");
  tl_device_t* d = sim_device("sim:1,cost=0,launch=500us", 0);
  tl_stream_t* s;
  ASSERT_OK(tl_stream_acquire(d, 0, &s));
  tl_event_t* e;
  ASSERT_OK(tl_event_init(d, 0, &e));
  struct timespec a, b;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
  for (int i = 0; i < 20; i++) ASSERT_OK(tl_kernel_async(s, 0));
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
  double ms = (double)(b.tv_sec - a.tv_sec) * 1e3 + (double)(b.tv_nsec - a.tv_nsec) / 1e6;
  /* 20 x 500 us of this thread's CPU, less the calibration's error: the loop is calibrated once
   * at configure (the fastest of 5 probes), and a probe slowed throughout (an SMT sibling busy,
   * a VM's stolen time counted as the thread's) makes the later launches cheaper; TSan under a
   * parallel ctest measured 9 ms and less. Half the cost still tells the option from no option
   * (20 launches without it cost microseconds). */
  ASSERT(ms >= 5.0);
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
  for (int i = 0; i < 20; i++) ASSERT_OK(tl_event_record(e, s));
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
  ms = (double)(b.tv_sec - a.tv_sec) * 1e3 + (double)(b.tv_nsec - a.tv_nsec) / 1e6;
  ASSERT(ms < 10.0);
  ASSERT_OK(tl_event_query(e));
  tl_event_close(e);
  tl_stream_release(s);
  return 0;
}

/* A gate on a stream: its callback holds the stream's later work until gate_open(). */
typedef struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int open;
} gate_t;

static void gate_wait(void* arg) {
  gate_t* g = arg;
  pthread_mutex_lock(&g->mu);
  while (!g->open) pthread_cond_wait(&g->cv, &g->mu);
  pthread_mutex_unlock(&g->mu);
}

static void gate_open(gate_t* g) {
  pthread_mutex_lock(&g->mu);
  g->open = 1;
  pthread_cond_broadcast(&g->cv);
  pthread_mutex_unlock(&g->mu);
}

/* Modelled copy time: 256 KiB at 10 MB/s is 26.21 ms of H2D engine time, pinned; the same from
 * pageable memory at 2.5 MB/s is 104.86 ms. Busy time counts the model exactly. Everything is
 * queued behind a gate, so the timings do not depend on how fast this thread queues (a slow
 * sanitizer build on a loaded machine took longer than a 5 ms kernel to queue it). The copies
 * are small against their modelled time because a real copy slower than the model stretches
 * it (real time wins): 4 MiB at 400 MB/s (10.49 ms) under TSan on a loaded CI machine did. */
TEST_IMPL(device_sim_copy_model) {
  tl_device_t* d = sim_device("sim:1,h2d=10MB/s,pageable=2.5MB/s", 0);
  tl_stream_t* s;
  ASSERT_OK(tl_stream_acquire(d, 0, &s));
  size_t n = 256 * 1024;
  pinned_t pin;
  unsigned char* hp = pinned_new(&pin, d, n);
  unsigned char* pg = malloc(n);
  memset(pg, 1, n);
  memset(hp, 2, n);
  tl_dbuf_t* b;
  ASSERT_OK(tl_dbuf_alloc(s, n, &b));
  tl_event_t *t0, *t1, *t2;
  ASSERT_OK(tl_event_init(d, TL_EVENT_TIMING, &t0));
  ASSERT_OK(tl_event_init(d, TL_EVENT_TIMING, &t1));
  ASSERT_OK(tl_event_init(d, TL_EVENT_TIMING, &t2));
  gate_t gate = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
  ASSERT_OK(tl_stream_callback(s, gate_wait, &gate)); /* nothing below starts before the gate */
  ASSERT_OK(tl_event_record(t0, s));
  ASSERT_OK(tl_copy_async(s, b->ptr, hp, n, TL_COPY_H2D));
  ASSERT_OK(tl_event_record(t1, s));
  ASSERT_OK(tl_copy_async(s, b->ptr, pg, n, TL_COPY_H2D));
  ASSERT_OK(tl_event_record(t2, s));
  gate_open(&gate);
  ASSERT_OK(tl_stream_sync(s, 10000));
  double pinned_ms, pageable_ms;
  ASSERT_OK(tl_event_elapsed(t0, t1, &pinned_ms));
  ASSERT_OK(tl_event_elapsed(t1, t2, &pageable_ms));
  ASSERT(pinned_ms > 26.20 && pinned_ms < 26.22);
  ASSERT(pageable_ms > 104.85 && pageable_ms < 104.87);
  tl_engine_stats_t st;
  ASSERT_OK(tl_sim_engine_stats(d, TL_ENGINE_H2D, &st));
  ASSERT_EQ(st.ops, 2);
  ASSERT_EQ(st.bytes, 2 * n);
  ASSERT(st.busy_ns > 131060000 && st.busy_ns < 131090000);
  ASSERT_OK(tl_dbuf_free(b));
  tl_event_close(t0);
  tl_event_close(t1);
  tl_event_close(t2);
  pinned_free(&pin);
  free(pg);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Streams from many threads
// ---------------------------------------------------------------------------------------------

typedef struct {
  tl_device_t* d;
  int rounds;
  uint64_t seed;
  _Atomic int* failures;
} submit_arg_t;

static void* submitter(void* p) {
  submit_arg_t* a = p;
  tl_stream_t* s;
  ASSERT_OK(tl_stream_acquire(a->d, 0, &s));
  tl_stream_t* again;
  tl_stream_release(s);
  ASSERT_OK(tl_stream_acquire(a->d, 0, &again));
  ASSERT(again == s); /* the thread's own pool gives it back */
  size_t n = 64 * KiB;
  unsigned char* src = malloc(n);
  unsigned char* dst = malloc(n);
  tl_event_t* e;
  ASSERT_OK(tl_event_init(a->d, 0, &e));
  for (int r = 0; r < a->rounds; r++) {
    fill_random(src, n, a->seed + (uint64_t)r);
    tl_dbuf_t* b;
    ASSERT_OK(tl_dbuf_alloc(s, n, &b));
    ASSERT_OK(tl_copy_async(s, b->ptr, src, n, TL_COPY_H2D));
    ASSERT_OK(tl_kernel_async(s, 10000));
    ASSERT_OK(tl_copy_async(s, dst, b->ptr, n, TL_COPY_D2H));
    ASSERT_OK(tl_event_record(e, s));
    ASSERT_OK(tl_event_wait(e, 10000));
    if (memcmp(src, dst, n) != 0) atomic_fetch_add(a->failures, 1);
    ASSERT_OK(tl_dbuf_free(b));
  }
  tl_event_close(e);
  tl_stream_release(s);
  free(src);
  free(dst);
  return NULL;
}

DEVICE_TEST(many_threads_submit, "sim:1") {
  enum { T = 8 };
  pthread_t th[T];
  submit_arg_t args[T];
  _Atomic int failures = 0;
  for (int i = 0; i < T; i++) {
    args[i] = (submit_arg_t){d, 64 / SCALE, 1000u * (uint64_t)i, &failures};
    ASSERT_EQ(pthread_create(&th[i], NULL, submitter, &args[i]), 0);
  }
  for (int i = 0; i < T; i++) pthread_join(th[i], NULL);
  ASSERT_EQ(atomic_load(&failures), 0);
  /* the exited threads' streams went back to the device: taking one creates none */
  int before = 0, after = 0;
  pthread_mutex_lock(&d->mu);
  for (tl_stream_t* x = d->all_streams; x; x = x->all_next) before++;
  pthread_mutex_unlock(&d->mu);
  ASSERT(before >= T);
  tl_stream_t* s;
  ASSERT_OK(tl_stream_acquire(d, 0, &s));
  pthread_mutex_lock(&d->mu);
  for (tl_stream_t* x = d->all_streams; x; x = x->all_next) after++;
  pthread_mutex_unlock(&d->mu);
  ASSERT_EQ(after, before);
  tl_dmem_stats_t st;
  ASSERT_OK(tl_device_mem_stats(d, &st));
  ASSERT_EQ(st.blocks_in_use, 0);
  ASSERT_EQ(st.allocs, (uint64_t)T * (64 / SCALE));
  return 0;
}

// ---------------------------------------------------------------------------------------------
// The caching allocator
// ---------------------------------------------------------------------------------------------

DEVICE_TEST(allocator_reuse_and_classes, "sim:1") {
  tl_stream_t *s1, *s2;
  ASSERT_OK(tl_stream_acquire(d, 0, &s1));
  ASSERT_OK(tl_stream_acquire(d, 0, &s2));
  tl_dmem_stats_t st0, st;
  ASSERT_OK(tl_device_mem_stats(d, &st0));
  tl_dbuf_t *a, *b, *c;
  ASSERT_OK(tl_dbuf_alloc(s1, 513, &a));
  ASSERT_EQ(a->size, 513);
  ASSERT(a->device == d);
  ASSERT_OK(tl_device_mem_stats(d, &st));
  ASSERT_EQ(st.bytes_in_use - st0.bytes_in_use, 640); /* 512 + 128: 4 classes per power */
  void* p = a->ptr;
  ASSERT_OK(tl_dbuf_free(a));
  ASSERT_OK(tl_dbuf_alloc(s1, 600, &b)); /* same class, same stream: the same block at once */
  ASSERT(b->ptr == p);
  ASSERT_EQ(b->size, 600);
  ASSERT_OK(tl_dbuf_alloc(s2, 600, &c)); /* another stream never takes it */
  ASSERT(c->ptr != p);
  ASSERT_OK(tl_dbuf_free(b));
  ASSERT_OK(tl_dbuf_free(c));
  ASSERT_OK(tl_device_mem_stats(d, &st));
  ASSERT_EQ(st.allocs - st0.allocs, 3);
  ASSERT_EQ(st.cache_hits - st0.cache_hits, 1);
  ASSERT_EQ(st.blocks_in_use, st0.blocks_in_use);
  ASSERT(st.blocks_cached >= 2);
  ASSERT_OK(tl_device_empty_cache(d));
  ASSERT_OK(tl_device_mem_stats(d, &st));
  ASSERT_EQ(st.blocks_cached, 0);
  ASSERT_EQ(st.bytes_cached, 0);
  ASSERT(st.device_frees >= 2);
  tl_dbuf_t* z;
  ASSERT_EQ(tl_dbuf_alloc(s1, 0, &z), TL_EINVAL);
  tl_stream_release(s1);
  tl_stream_release(s2);
  return 0;
}

/* A block used on another stream is not reused on its own stream until that use completed. */
DEVICE_TEST(allocator_cross_stream_free, "sim:1") {
  tl_stream_t *own, *other;
  ASSERT_OK(tl_stream_acquire(d, 0, &own));
  ASSERT_OK(tl_stream_acquire(d, 0, &other));
  tl_dbuf_t* a;
  ASSERT_OK(tl_dbuf_alloc(own, 4096, &a));
  void* p = a->ptr;
  ASSERT_OK(tl_kernel_async(other, 50000000)); /* other is busy for 50 ms ... */
  ASSERT_OK(tl_memset_async(other, a->ptr, 0, 4096)); /* ... then uses the block */
  ASSERT_OK(tl_dbuf_record_stream(a, other));
  ASSERT_OK(tl_dbuf_record_stream(a, own)); /* its own stream: nothing to record */
  ASSERT_OK(tl_dbuf_free(a));
  tl_dbuf_t* b;
  ASSERT_OK(tl_dbuf_alloc(own, 4096, &b));
  if (d->kind == TL_DEVICE_SIM) ASSERT(b->ptr != p); /* still in use on `other` */
  ASSERT_OK(tl_stream_sync(other, 10000));
  tl_dbuf_t* c;
  ASSERT_OK(tl_dbuf_alloc(own, 4096, &c));
  ASSERT(c->ptr == p || b->ptr == p); /* reused once `other` was done */
  ASSERT_OK(tl_dbuf_free(b));
  ASSERT_OK(tl_dbuf_free(c));
  tl_stream_release(own);
  tl_stream_release(other);
  return 0;
}

/* The same through another library's stream handle (a DLPack consumer's: tl_dbuf_record_handle,
 * tl_event_record_on); here a threadloom stream's raw handle stands for torch's. */
DEVICE_TEST(allocator_foreign_stream_free, "sim:1") {
  tl_stream_t *own, *other;
  ASSERT_OK(tl_stream_acquire(d, 0, &own));
  ASSERT_OK(tl_stream_acquire(d, 0, &other));
  tl_dbuf_t* a;
  ASSERT_OK(tl_dbuf_alloc(own, 4096, &a));
  void* p = a->ptr;
  ASSERT_OK(tl_kernel_async(other, 50000000));
  ASSERT_OK(tl_memset_async(other, a->ptr, 0, 4096));
  ASSERT_OK(tl_dbuf_record_handle(a, tl_stream_handle(other)));
  ASSERT_OK(tl_dbuf_record_handle(a, tl_stream_handle(own))); /* its own: nothing to record */
  ASSERT_OK(tl_dbuf_free(a));
  tl_dbuf_t* b;
  ASSERT_OK(tl_dbuf_alloc(own, 4096, &b));
  if (d->kind == TL_DEVICE_SIM) ASSERT(b->ptr != p); /* still in use on `other` */
  ASSERT_OK(tl_stream_sync(other, 10000));
  tl_dbuf_t* c;
  ASSERT_OK(tl_dbuf_alloc(own, 4096, &c));
  ASSERT(c->ptr == p || b->ptr == p);
  /* an event recorded on a foreign handle completes with that stream's work */
  tl_event_t* e;
  ASSERT_OK(tl_event_init(d, 0, &e));
  ASSERT_OK(tl_kernel_async(other, 30000000));
  ASSERT_OK(tl_event_record_on(e, d, tl_stream_handle(other)));
  ASSERT_EQ(tl_event_query(e), TL_EAGAIN);
  ASSERT_OK(tl_event_wait(e, 10000));
  tl_event_close(e);
  ASSERT_OK(tl_dbuf_free(b));
  ASSERT_OK(tl_dbuf_free(c));
  tl_stream_release(own);
  tl_stream_release(other);
  return 0;
}

typedef struct {
  tl_device_t* d;
  tl_dbuf_t** slots;     /* hand-over slots between the allocating and the freeing thread */
  _Atomic int* full;
  int n;
  int rounds;
} xfree_arg_t;

static void* xfree_allocator(void* p) {
  xfree_arg_t* a = p;
  tl_stream_t* s;
  ASSERT_OK(tl_stream_acquire(a->d, 0, &s));
  uint64_t x = 88172645463325252ull;
  for (int r = 0; r < a->rounds; r++) {
    int k = r % a->n;
    while (atomic_load_explicit(&a->full[k], memory_order_acquire)) sched_yield();
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    tl_dbuf_t* b;
    ASSERT_OK(tl_dbuf_alloc(s, 1 + (size_t)(x % (256 * KiB)), &b));
    a->slots[k] = b;
    atomic_store_explicit(&a->full[k], 1, memory_order_release);
  }
  tl_stream_release(s);
  return NULL;
}

static void* xfree_freer(void* p) {
  xfree_arg_t* a = p;
  for (int r = 0; r < a->rounds; r++) {
    int k = r % a->n;
    while (!atomic_load_explicit(&a->full[k], memory_order_acquire)) sched_yield();
    ASSERT_OK(tl_dbuf_free(a->slots[k]));
    atomic_store_explicit(&a->full[k], 0, memory_order_release);
  }
  return NULL;
}

/* Blocks allocated on one thread and freed on another, two pairs at once. */
TEST_IMPL(device_allocator_frees_from_other_threads) {
  tl_device_t* d = sim_device("sim:1,cost=0", 0);
  enum { PAIRS = 2, N = 16 };
  pthread_t th[2 * PAIRS];
  xfree_arg_t args[PAIRS];
  tl_dbuf_t* slots[PAIRS][N];
  _Atomic int full[PAIRS][N];
  memset(full, 0, sizeof full);
  for (int i = 0; i < PAIRS; i++) {
    args[i] = (xfree_arg_t){d, slots[i], full[i], N, 20000 / SCALE};
    ASSERT_EQ(pthread_create(&th[2 * i], NULL, xfree_allocator, &args[i]), 0);
    ASSERT_EQ(pthread_create(&th[2 * i + 1], NULL, xfree_freer, &args[i]), 0);
  }
  for (int i = 0; i < 2 * PAIRS; i++) pthread_join(th[i], NULL);
  tl_dmem_stats_t st;
  ASSERT_OK(tl_device_mem_stats(d, &st));
  ASSERT_EQ(st.blocks_in_use, 0);
  ASSERT_EQ(st.bytes_in_use, 0);
  ASSERT_EQ(st.allocs, (uint64_t)PAIRS * (20000 / SCALE));
  ASSERT(st.cache_hits > st.allocs / 2); /* a few hundred classes, reused over and over */
  ASSERT_EQ(st.device_allocs, st.blocks_cached);
  ASSERT_OK(tl_device_empty_cache(d));
  ASSERT_OK(tl_device_mem_stats(d, &st));
  ASSERT_EQ(st.blocks_cached, 0);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Staging
// ---------------------------------------------------------------------------------------------

typedef struct {
  tl_dbuf_t* buf;
  tl_event_t* done;
  uint32_t tag;   /* producer << 16 | sequence */
} batch_t;

typedef struct {
  tl_device_t* d;
  tl_staging_t* pool;
  int producers;
  int per_producer;
  size_t bytes;
  batch_t* ring;          /* producer i's batches at [i * per_producer, ...) */
  _Atomic int* ready;     /* 1 once the batch is submitted */
  _Atomic int bad;        /* batches whose device bytes were not what was written */
  _Atomic int poisoned;   /* of those, ones holding the poison byte */
  int index;
} stage_arg_t;

static uint8_t pattern(uint32_t tag, size_t i) { return (uint8_t)(tag * 2654435761u >> 24) ^ (uint8_t)i; }

typedef struct {
  stage_arg_t* shared;
  int id;
} producer_arg_t;

static void* stage_producer(void* p) {
  producer_arg_t* pa = p;
  stage_arg_t* a = pa->shared;
  tl_stream_t* s;
  ASSERT_OK(tl_stream_acquire(a->d, 0, &s));
  for (int k = 0; k < a->per_producer; k++) {
    uint32_t tag = (uint32_t)pa->id << 16 | (uint32_t)k;
    tl_staging_slot_t* slot;
    ASSERT_OK(tl_staging_acquire(a->pool, 30000, &slot));
    unsigned char* b = slot->ptr;
    for (size_t i = 0; i < a->bytes; i++) b[i] = pattern(tag, i);
    batch_t* out = &a->ring[pa->id * a->per_producer + k];
    ASSERT_OK(tl_dbuf_alloc(s, a->bytes, &out->buf));
    ASSERT_OK(tl_staging_copy_to_device(slot, out->buf->ptr, a->bytes, s));
    ASSERT_OK(tl_event_init(a->d, 0, &out->done));
    ASSERT_OK(tl_event_record(out->done, s));
    out->tag = tag;
    atomic_store_explicit(&a->ready[pa->id * a->per_producer + k], 1, memory_order_release);
  }
  tl_stream_release(s);
  return NULL;
}

/* Checks every batch once its event completed (a D2H copy on a GPU; sim memory is host
 * memory, read directly). */
static void check_batches(stage_arg_t* a) {
  int total = a->producers * a->per_producer;
  tl_stream_t* s;
  ASSERT_OK(tl_stream_acquire(a->d, 0, &s));
  unsigned char* back = malloc(a->bytes);
  for (int k = 0; k < total; k++) {
    while (!atomic_load_explicit(&a->ready[k], memory_order_acquire)) sched_yield();
    batch_t* bt = &a->ring[k];
    ASSERT_OK(tl_event_wait(bt->done, 30000));
    ASSERT_OK(tl_stream_wait_event(s, bt->done));
    ASSERT_OK(tl_copy_async(s, back, bt->buf->ptr, a->bytes, TL_COPY_D2H));
    ASSERT_OK(tl_stream_sync(s, 30000));
    int bad = 0, poison = 0;
    for (size_t i = 0; i < a->bytes; i++)
      if (back[i] != pattern(bt->tag, i)) {
        bad = 1;
        poison |= back[i] == 0xEE;
      }
    atomic_fetch_add(&a->bad, bad);
    atomic_fetch_add(&a->poisoned, poison);
    ASSERT_OK(tl_dbuf_record_stream(bt->buf, s));
    ASSERT_OK(tl_dbuf_free(bt->buf));
    tl_event_close(bt->done);
  }
  free(back);
  tl_stream_release(s);
}

/* Runs producers through a 4-slot pool into a slowed H2D engine; returns the bad batches. */
static int staging_run(tl_device_t* d, int producers, int per_producer, int* poisoned) {
  tl_staging_options_t o = {.device = d, .slot_bytes = 64 * KiB, .slots = 4, .numa_node = -1};
  stage_arg_t a = {.d = d, .producers = producers, .per_producer = per_producer,
                   .bytes = 64 * KiB};
  ASSERT_OK(tl_staging_init(&a.pool, &o));
  int total = producers * per_producer;
  a.ring = calloc((size_t)total, sizeof *a.ring);
  a.ready = calloc((size_t)total, sizeof *a.ready);
  atomic_store(&tl__staging_poison_byte, 0xEE);
  pthread_t th[16];
  producer_arg_t pa[16];
  for (int i = 0; i < producers; i++) {
    pa[i] = (producer_arg_t){&a, i};
    ASSERT_EQ(pthread_create(&th[i], NULL, stage_producer, &pa[i]), 0);
  }
  check_batches(&a);
  for (int i = 0; i < producers; i++) pthread_join(th[i], NULL);
  atomic_store(&tl__staging_poison_byte, -1);
  tl_staging_stats_t st;
  ASSERT_OK(tl_staging_stats(a.pool, &st));
  ASSERT_EQ(st.out, 0);
  ASSERT_EQ(st.acquires, (uint64_t)total);
  ASSERT_EQ(st.pinned, 1);
  ASSERT_OK(tl_staging_close(a.pool));
  free(a.ring);
  free((void*)a.ready);
  *poisoned = atomic_load(&a.poisoned);
  return atomic_load(&a.bad);
}

/* 8 producers, 4 slots, a copy engine at 64 MB/s (1 ms per 64 KiB batch): slots are reused all
 * the time and every acquire hands out a poisoned slot, yet no consumer sees poison. */
DEVICE_TEST(staging_reuse_many_producers, "sim:1,h2d=64MB/s") {
  int poisoned;
  int bad = staging_run(d, 8, 48 / SCALE, &poisoned);
  ASSERT_EQ(bad, 0);
  ASSERT_EQ(poisoned, 0);
  return 0;
}

/* The same with the event gate switched off (a test hook): consumers do see poison, so the test
 * above would catch the race it guards against. */
TEST_IMPL(device_staging_race_is_caught_without_the_gate) {
#if defined(__SANITIZE_THREAD__)
  SKIP("a deliberate race between producers and the copy engine, which ThreadSanitizer reports");
#endif
  tl_device_t* d = sim_device("sim:1,h2d=64MB/s", 0);
  atomic_store(&tl__staging_unsafe, 1);
  int poisoned;
  int bad = staging_run(d, 8, 16, &poisoned);
  atomic_store(&tl__staging_unsafe, 0);
  fprintf(stderr, "without the gate: %d of 128 batches wrong, %d with poison\n", bad, poisoned);
  ASSERT(bad > 0);
  return 0;
}

TEST_IMPL(device_staging_errors) {
  tl_device_t* d = sim_device("sim:1", 0);
  tl_staging_t* p;
  tl_staging_options_t o = {.device = d, .slot_bytes = 0, .slots = 2, .numa_node = -1};
  ASSERT_EQ(tl_staging_init(&p, &o), TL_EINVAL);
  o.slot_bytes = 4096;
  ASSERT_OK(tl_staging_init(&p, &o));
  tl_staging_slot_t *a, *b, *c;
  ASSERT_OK(tl_staging_acquire(p, 100, &a));
  ASSERT_OK(tl_staging_acquire(p, 100, &b));
  double t0 = now_ms();
  ASSERT_EQ(tl_staging_acquire(p, 50, &c), TL_ETIMEDOUT); /* both held */
  ASSERT(now_ms() - t0 >= 45);
  ASSERT_CONTAINS(tl_err_detail(), "2 held by producers");
  ASSERT_EQ(tl_staging_close(p), TL_EBUSY);
  tl_stream_t* s;
  ASSERT_OK(tl_stream_acquire(d, 0, &s));
  tl_dbuf_t* buf;
  ASSERT_OK(tl_dbuf_alloc(s, 8192, &buf));
  ASSERT_EQ(tl_staging_copy_to_device(a, buf->ptr, 8192, s), TL_EINVAL); /* larger than a slot */
  ASSERT_OK(tl_staging_acquire(p, 100, &a)); /* that slot came back anyway */
  /* a D2H into a slot, then a release without a stream: the slot still waits for the copy */
  ASSERT_OK(tl_memset_async(s, buf->ptr, 0x42, 4096));
  ASSERT_OK(tl_staging_copy_from_device(b, 0, buf->ptr, 4096, s));
  ASSERT_OK(tl_staging_wait(b, 5000));
  ASSERT_EQ(((unsigned char*)b->ptr)[4095], 0x42);
  /* at an offset, two copies into one slot: the event covers both */
  ASSERT_OK(tl_memset_async(s, buf->ptr, 0x17, 100));
  ASSERT_OK(tl_staging_copy_from_device(b, 4000, buf->ptr, 96, s));
  ASSERT_OK(tl_staging_copy_from_device(b, 8, buf->ptr, 8, s));
  ASSERT_EQ(tl_staging_copy_from_device(b, 4000, buf->ptr, 97, s), TL_EINVAL);
  ASSERT_OK(tl_staging_wait(b, 5000));
  ASSERT_EQ(((unsigned char*)b->ptr)[4000], 0x17);
  ASSERT_EQ(((unsigned char*)b->ptr)[4095], 0x17);
  ASSERT_EQ(((unsigned char*)b->ptr)[15], 0x17);
  ASSERT_EQ(((unsigned char*)b->ptr)[16], 0x42);
  ASSERT_EQ(((unsigned char*)b->ptr)[3999], 0x42);
  ASSERT_OK(tl_staging_release(a, NULL));
  ASSERT_OK(tl_staging_release(b, NULL));
  ASSERT_OK(tl_dbuf_free(buf));
  ASSERT_OK(tl_staging_close(p));
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Fault injection (sim): every error is clear, nothing hangs, staging slots come back
// ---------------------------------------------------------------------------------------------

TEST_IMPL(device_fault_out_of_memory) {
  tl_device_t* d = sim_device("sim:1,mem=64MiB", 0);
  tl_stream_t* s;
  ASSERT_OK(tl_stream_acquire(d, 0, &s));
  tl_dbuf_t *a, *b;
  ASSERT_OK(tl_sim_inject(d, TL_SIM_FAULT_OOM, 1)); /* one failure: the retry succeeds */
  ASSERT_OK(tl_dbuf_alloc(s, MiB, &a));
  tl_dmem_stats_t st;
  ASSERT_OK(tl_device_mem_stats(d, &st));
  ASSERT_EQ(st.oom_retries, 1);
  ASSERT_OK(tl_sim_inject(d, TL_SIM_FAULT_OOM, 2));
  ASSERT_EQ(tl_dbuf_alloc(s, MiB, &b), TL_ENOMEM);
  ASSERT_CONTAINS(tl_err_detail(), "injected out-of-memory");
  ASSERT_CONTAINS(tl_err_detail(), "after emptying the cache");
  /* the real limit: 48 MiB live, 32 more do not fit, even after the cache was emptied */
  ASSERT_OK(tl_dbuf_free(a));
  ASSERT_OK(tl_dbuf_alloc(s, 48 * MiB, &a));
  ASSERT_EQ(tl_dbuf_alloc(s, 32 * MiB, &b), TL_ENOMEM);
  ASSERT_CONTAINS(tl_err_detail(), "mem=");
  ASSERT_OK(tl_dbuf_free(a));
  ASSERT_OK(tl_dbuf_alloc(s, 32 * MiB, &b)); /* the 48 MiB block is cached: empty + retry */
  ASSERT_OK(tl_dbuf_free(b));
  return 0;
}

TEST_IMPL(device_fault_failed_copy) {
  tl_device_t* d = sim_device("sim:1", 0);
  tl_stream_t* s;
  ASSERT_OK(tl_stream_acquire(d, 0, &s));
  unsigned char host[4096];
  memset(host, 3, sizeof host);
  tl_dbuf_t* b;
  ASSERT_OK(tl_dbuf_alloc(s, sizeof host, &b));
  tl_event_t* e;
  ASSERT_OK(tl_event_init(d, 0, &e));
  ASSERT_OK(tl_sim_inject(d, TL_SIM_FAULT_COPY, 1));
  ASSERT_EQ(tl_copy_async(s, b->ptr, host, sizeof host, TL_COPY_H2D), TL_ECUDA);
  ASSERT_CONTAINS(tl_err_detail(), "injected copy failure");
  ASSERT_OK(tl_copy_async(s, b->ptr, host, sizeof host, TL_COPY_H2D)); /* the next one works */
  ASSERT_OK(tl_event_record(e, s));
  ASSERT_OK(tl_event_wait(e, 5000));
  ASSERT_OK(tl_stream_sync(s, 5000));
  /* a staging slot whose copy could not be queued comes back at once */
  tl_staging_t* p;
  tl_staging_options_t o = {.device = d, .slot_bytes = 4096, .slots = 1, .numa_node = -1};
  ASSERT_OK(tl_staging_init(&p, &o));
  tl_staging_slot_t* slot;
  ASSERT_OK(tl_staging_acquire(p, 1000, &slot));
  ASSERT_OK(tl_sim_inject(d, TL_SIM_FAULT_COPY, 1));
  ASSERT_EQ(tl_staging_copy_to_device(slot, b->ptr, 4096, s), TL_ECUDA);
  ASSERT_CONTAINS(tl_err_detail(), "injected copy failure");
  ASSERT_OK(tl_staging_acquire(p, 1000, &slot));
  ASSERT_OK(tl_staging_release(slot, NULL));
  ASSERT_OK(tl_staging_close(p));
  tl_event_close(e);
  ASSERT_OK(tl_dbuf_free(b));
  return 0;
}

/* A device lost under queued work: every waiter returns promptly with TL_EDEVLOST, new work is
 * refused at once, staging slots come back; tl_sim_recover makes it usable again. */
TEST_IMPL(device_fault_lost_device) {
  tl_device_t* d = sim_device("sim:1,h2d=10MB/s", 0);
  tl_stream_t* s;
  ASSERT_OK(tl_stream_acquire(d, 0, &s));
  tl_staging_t* p;
  tl_staging_options_t o = {.device = d, .slot_bytes = MiB, .slots = 2, .numa_node = -1};
  ASSERT_OK(tl_staging_init(&p, &o));
  tl_dbuf_t* b;
  ASSERT_OK(tl_dbuf_alloc(s, MiB, &b));
  tl_staging_slot_t* slot;
  for (int i = 0; i < 2; i++) { /* two 100 ms copies queued */
    ASSERT_OK(tl_staging_acquire(p, 1000, &slot));
    ASSERT_OK(tl_staging_copy_to_device(slot, b->ptr, MiB, s));
  }
  cb_log_t log;
  memset(&log, 0, sizeof log);
  cb_arg_t arg = {&log, 7};
  ASSERT_OK(tl_stream_callback(s, cb_note, &arg)); /* host work still runs: it may free things */
  tl_event_t* e;
  ASSERT_OK(tl_event_init(d, 0, &e));
  ASSERT_OK(tl_event_record(e, s));
  double t0 = now_ms();
  ASSERT_OK(tl_sim_inject(d, TL_SIM_FAULT_LOST, 0));
  ASSERT_EQ(tl_event_wait(e, 5000), TL_EDEVLOST);
  ASSERT_CONTAINS(tl_err_detail(), "injected device loss");
  ASSERT(now_ms() - t0 < 1000); /* the second copy was not waited for */
  ASSERT_EQ(tl_stream_sync(s, 5000), TL_EDEVLOST);
  ASSERT_EQ(atomic_load(&log.n), 1);
  ASSERT_EQ(atomic_load(&log.order[0]), 7);
  ASSERT_EQ(tl_kernel_async(s, 0), TL_EDEVLOST);
  ASSERT_EQ(tl_event_record(e, s), TL_EDEVLOST);
  ASSERT_EQ(tl_event_wait(e, 1000), TL_EDEVLOST); /* that record never happened: no hang */
  tl_dbuf_t* c;
  ASSERT_EQ(tl_dbuf_alloc(s, 1 << 20, &c), TL_EDEVLOST);
  for (int i = 0; i < 2; i++) { /* the slots came back */
    ASSERT_OK(tl_staging_acquire(p, 1000, &slot));
    ASSERT_OK(tl_staging_release(slot, NULL));
  }
  ASSERT_OK(tl_sim_recover(d));
  tl_event_close(e);
  ASSERT_OK(tl_event_init(d, 0, &e)); /* a fresh event: the old one carried the error */
  ASSERT_OK(tl_kernel_async(s, 0));
  ASSERT_OK(tl_event_record(e, s));
  ASSERT_OK(tl_event_wait(e, 1000));
  ASSERT_OK(tl_dbuf_free(b));
  ASSERT_OK(tl_staging_close(p));
  tl_event_close(e);
  return 0;
}

TEST_IMPL(device_fault_use_after_free_and_overrun) {
  tl_device_t* d = sim_device("sim:1", 0);
  tl_stream_t* s;
  ASSERT_OK(tl_stream_acquire(d, 0, &s));
  unsigned char host[8192];
  tl_dbuf_t* b;
  ASSERT_OK(tl_dbuf_alloc(s, 4096, &b));
  /* an overrun: 4097 bytes out of a 4096-byte block */
  ASSERT_OK(tl_copy_async(s, host, b->ptr, 4097, TL_COPY_D2H));
  ASSERT_EQ(tl_stream_sync(s, 5000), TL_EDEVLOST);
  ASSERT_CONTAINS(tl_err_detail(), "overruns the 4096-byte block");
  ASSERT_OK(tl_sim_recover(d));
  /* a use after free: the block went back to the device (empty_cache), then is read */
  void* stale = b->ptr;
  ASSERT_OK(tl_dbuf_free(b));
  ASSERT_OK(tl_device_empty_cache(d));
  ASSERT_OK(tl_copy_async(s, host, stale, 16, TL_COPY_D2H));
  ASSERT_EQ(tl_stream_sync(s, 5000), TL_EDEVLOST);
  ASSERT_CONTAINS(tl_err_detail(), "use after free");
  ASSERT_OK(tl_sim_recover(d));
  /* host memory passed as device memory */
  ASSERT_OK(tl_copy_async(s, host, host + 4096, 16, TL_COPY_D2H));
  ASSERT_EQ(tl_stream_sync(s, 5000), TL_EDEVLOST);
  ASSERT_CONTAINS(tl_err_detail(), "not in any allocation");
  ASSERT_OK(tl_sim_recover(d));
  ASSERT_OK(tl_stream_sync(s, 5000));
  return 0;
}

TEST_IMPL(device_sim_controls_refuse_cuda) {
  tl_device_t* d = sim_device("sim:1", 0);
  ASSERT_EQ(tl_sim_set(d, "mem=1GiB"), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "cannot change on a running device");
  ASSERT_OK(tl_sim_set(d, "h2d=1GB/s,d2h=2GB/s"));
  ASSERT_EQ(tl_sim_inject(d, (tl_sim_fault_t)9, 1), TL_EINVAL);
  tl_engine_stats_t st;
  ASSERT_EQ(tl_sim_engine_stats(d, (tl_engine_t)7, &st), TL_EINVAL);
  ASSERT_EQ(tl_sim_engine_stats(NULL, TL_ENGINE_H2D, &st), TL_EINVAL);
  return 0;
}
