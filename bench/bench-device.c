/* bench/bench-device.c: the device layer from C, on simulated devices (and on a GPU with
 * --cuda): submission rate, the caching allocator, and the sim's timing precision.
 *
 *   tl-bench-device [--sections launch,alloc,timing] [--threads 1,2] [--seconds S] [--cuda]
 *                   [--devices N] [--spec SIM_SPEC] [--pin LOADERS] [--json FILE]
 *
 * Each section runs in a forked child (the sim's configuration is per process):
 *   launch  kernels of 0 ns per second per thread, each thread on its own pooled stream: on
 *           "sim:1,cost=0" (operations run at once and cost nothing; --spec for another, e.g.
 *           "sim:8,cost=0,launch=1us", a driver's launch cost modelled) this is the raw C rate
 *           of threadloom's own submission path, the baseline the Python benchmark
 *           (bench/bench_devices.py) compares against; with --cuda, real launches. --devices N:
 *           thread i launches on device i mod N (sim:0..N-1; with --cuda the first N GPUs, or
 *           cuda:0 alone when fewer exist: one stream per thread). --pin LOADERS: thread i is
 *           pinned to launch slot i of a placement plan with one entry per thread on its
 *           device's NUMA node and LOADERS loader threads each (the cores bench_devices.py's
 *           loader threads avoid).
 *   alloc   tl_dbuf_alloc + tl_dbuf_free pairs per second per thread (512 B, 64 KiB, 4 MiB; each
 *           thread on its own stream), against the same pair with the cache emptied after each
 *           free (every block from the device: cudaMalloc/cudaFree on a GPU), in the same run.
 *           Goal: >= 10M cached pairs/s per thread.
 *   timing  how closely the sim keeps its model: 200 back-to-back 1 MiB pinned H2D copies at a
 *           modelled bandwidth below this host's memcpy speed (wall time against the model;
 *           engine busy time; how late completions were observed), and 200 host round trips of
 *           a 100 us kernel (launch, record, wait), with spin=0 (sleep to the deadline) and
 *           spin=50us.
 * --json FILE writes every result (bench/report.py draws the report). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "launch-loop.h"
#include "threadloom/threadloom.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void check(int rc, const char* what) {
  if (rc != 0) {
    fprintf(stderr, "tl-bench-device: %s: %s: %s (%s)\n", what, tl_err_name(rc), tl_strerror(rc),
            tl_err_detail());
    exit(1);
  }
}

static int threads_list[8] = {1, 2};
static int nthreads_list = 2;
static double seconds = 1.0;
static int use_cuda = 0;
static int ndevices = 1;            /* --devices */
static const char* launch_spec = NULL; /* --spec: the launch section's sim spec */
static int pin_loaders = -1;        /* --pin LOADERS; -1: no pinning */

/* The device the sections run on: cuda:0 with --cuda, else sim:0 of `spec`. */
static tl_device_t* bench_device(const char* spec) {
  tl_device_t* d;
  if (use_cuda) {
    check(tl_device_get(TL_DEVICE_CUDA, 0, &d), "cuda:0");
  } else {
    check(tl_devices_select(spec), spec);
    check(tl_device_get(TL_DEVICE_SIM, 0, &d), "sim:0");
  }
  return d;
}

// ---------------------------------------------------------------------------------------------
// launch
// ---------------------------------------------------------------------------------------------

typedef struct {
  tl_device_t* d;
  pthread_barrier_t* go;
  const tl_plan_t* plan; /* pin to `slot` of it first; NULL: unpinned */
  int slot;
  double ops_per_s;     /* wall clock */
  double ops_per_cpu_s; /* per second of the thread's own CPU time */
} launch_arg_t;

static void* launch_thread(void* p) {
  launch_arg_t* a = p;
  if (a->plan) check(tl_pin_self(a->plan, a->slot, NULL), "pin to the launch slot");
  tl_stream_t* s;
  check(tl_stream_acquire(a->d, 0, &s), "stream");
  for (int i = 0; i < 1000; i++) check(tl_kernel_async(s, 0), "warm-up launch");
  check(tl_stream_sync(s, -1), "sync");
  pthread_barrier_wait(a->go);
  tl_bench_launch_t r;
  check(tl_bench_launch_loop(s, seconds, &r), "launch loop");
  a->ops_per_s = r.ops_per_s;
  a->ops_per_cpu_s = r.ops_per_cpu_s;
  tl_stream_release(s);
  return NULL;
}

/* The launch section's devices (--devices N): sim:0..N-1 of the spec, or the first N GPUs
 * (cuda:0 alone when fewer are present). Returns how many distinct devices there are. */
static int launch_devices(const char* spec, tl_device_t** devs) {
  int n = ndevices < 1 ? 1 : ndevices > 64 ? 64 : ndevices;
  if (use_cuda) {
    int count = 0;
    check(tl_cuda_device_count(&count), "cuda device count");
    if (count < 1) check(TL_ENODEV, "cuda devices");
    if (count < n) n = count; /* one GPU: every thread on a stream of cuda:0 */
    for (int i = 0; i < n; i++) check(tl_device_get(TL_DEVICE_CUDA, i, &devs[i]), "cuda device");
    return n;
  }
  check(tl_devices_select(spec), spec);
  for (int i = 0; i < n; i++) check(tl_device_get(TL_DEVICE_SIM, i, &devs[i]), "sim device");
  return n;
}

/* The plan the launch threads pin to: one "device" per launch thread (thread i drives device
 * i mod n, so with one GPU every thread gets a launch core of its own on the GPU's node), each
 * on its device's NUMA node with pin_loaders loaders: what bench_devices.py plans too. */
static tl_plan_t* launch_plan(tl_device_t** devs, int n, int threads) {
  tl_topo_t* topo;
  check(tl_topo_init(&topo, NULL), "topology");
  int nodes[64];
  for (int i = 0; i < threads; i++) {
    tl_device_props_t pr;
    check(tl_device_props(devs[i % n], &pr), "device properties");
    nodes[i] = pr.numa_node;
  }
  tl_plan_spec_t spec;
  tl_plan_spec_default(&spec);
  spec.device_nodes = nodes;
  spec.ndevice_nodes = threads;
  spec.loaders_per_gpu = pin_loaders;
  tl_plan_t* plan;
  check(tl_plan_init(&plan, topo, &spec), "plan");
  tl_topo_close(topo);
  return plan;
}

static void section_launch(FILE* out) {
  const char* spec = launch_spec ? launch_spec : "sim:1,cost=0";
  tl_device_t* devs[64];
  int n = launch_devices(spec, devs);
  int most = 1;
  for (int k = 0; k < nthreads_list; k++) most = threads_list[k] > most ? threads_list[k] : most;
  tl_plan_t* plan = pin_loaders >= 0 ? launch_plan(devs, n, most) : NULL;
  fprintf(out, "\"launch\": {\"device\": \"%s\", \"spec\": \"%s\", \"devices\": %d, "
          "\"pinned\": %s, \"rows\": [", tl_device_name(devs[0]), use_cuda ? "cuda" : spec, n,
          plan ? "true" : "false");
  for (int k = 0; k < nthreads_list; k++) {
    int T = threads_list[k];
    pthread_t th[64];
    launch_arg_t args[64];
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, (unsigned)T);
    for (int i = 0; i < T; i++) {
      args[i] = (launch_arg_t){devs[i % n], &go, plan, 0, 0, 0};
      if (plan) check(tl_plan_find(plan, TL_ROLE_LAUNCH, i, 0, &args[i].slot), "launch slot");
      pthread_create(&th[i], NULL, launch_thread, &args[i]);
    }
    double sum = 0, lo = 1e30, cpu = 0;
    for (int i = 0; i < T; i++) {
      pthread_join(th[i], NULL);
      sum += args[i].ops_per_s;
      cpu += args[i].ops_per_cpu_s;
      if (args[i].ops_per_s < lo) lo = args[i].ops_per_s;
    }
    pthread_barrier_destroy(&go);
    printf("launch  %-8s %2d thread(s) on %d device(s)%s: %10.0f launches/s per thread (slowest "
           "%.0f), %.0f in all\n", tl_device_name(devs[0]), T, T < n ? T : n,
           plan ? ", pinned" : "", sum / T, lo, sum);
    fprintf(out, "%s{\"threads\": %d, \"per_thread\": %.0f, \"slowest\": %.0f, \"total\": %.0f, "
            "\"per_thread_cpu\": %.0f}", k ? ", " : "", T, sum / T, lo, sum, cpu / T);
  }
  fprintf(out, "]}");
  tl_plan_close(plan);
}

// ---------------------------------------------------------------------------------------------
// alloc
// ---------------------------------------------------------------------------------------------

typedef struct {
  tl_device_t* d;
  size_t size;
  int uncached;
  pthread_barrier_t* go;
  double pairs_per_s;
} alloc_arg_t;

static void* alloc_thread(void* p) {
  alloc_arg_t* a = p;
  tl_stream_t* s;
  check(tl_stream_acquire(a->d, 0, &s), "stream");
  tl_dbuf_t* b;
  check(tl_dbuf_alloc(s, a->size, &b), "warm-up alloc");
  check(tl_dbuf_free(b), "free");
  pthread_barrier_wait(a->go);
  uint64_t n = 0;
  double t0 = now_s(), t;
  double budget = a->uncached ? seconds / 4 : seconds;
  do {
    int batch = a->uncached ? 16 : 4096;
    for (int i = 0; i < batch; i++) {
      if (tl_dbuf_alloc(s, a->size, &b) != 0) check(-1, "alloc");
      tl_dbuf_free(b);
      if (a->uncached) tl_device_empty_cache(a->d);
    }
    n += (uint64_t)batch;
    t = now_s();
  } while (t - t0 < budget);
  a->pairs_per_s = (double)n / (t - t0);
  tl_stream_release(s);
  return NULL;
}

static double alloc_run(tl_device_t* d, size_t size, int T, int uncached) {
  pthread_t th[64];
  alloc_arg_t args[64];
  pthread_barrier_t go;
  pthread_barrier_init(&go, NULL, (unsigned)T);
  for (int i = 0; i < T; i++) {
    args[i] = (alloc_arg_t){d, size, uncached, &go, 0};
    pthread_create(&th[i], NULL, alloc_thread, &args[i]);
  }
  double sum = 0;
  for (int i = 0; i < T; i++) {
    pthread_join(th[i], NULL);
    sum += args[i].pairs_per_s;
  }
  pthread_barrier_destroy(&go);
  return sum / T;
}

static void section_alloc(FILE* out) {
  tl_device_t* d = bench_device("sim:1,poison=0");
  static const size_t sizes[] = {512, 64 << 10, 4 << 20};
  fprintf(out, "\"alloc\": {\"device\": \"%s\", \"rows\": [", tl_device_name(d));
  int first = 1;
  for (size_t z = 0; z < sizeof sizes / sizeof sizes[0]; z++)
    for (int k = 0; k < nthreads_list; k++) {
      int T = threads_list[k];
      /* the uncached baseline empties the whole device's cache: one thread only */
      double cached = alloc_run(d, sizes[z], T, 0);
      double raw = T == 1 ? alloc_run(d, sizes[z], 1, 1) : 0;
      printf("alloc   %-8s %8zu B %2d thread(s): %11.0f cached pairs/s per thread", tl_device_name(d),
             sizes[z], T, cached);
      if (raw > 0) printf("  (from the device each time: %.0f/s, %.0fx)", raw, cached / raw);
      printf("\n");
      fprintf(out, "%s{\"size\": %zu, \"threads\": %d, \"cached_per_thread\": %.0f, "
              "\"uncached\": %.0f}", first ? "" : ", ", sizes[z], T, cached, raw);
      first = 0;
    }
  fprintf(out, "]}");
}

// ---------------------------------------------------------------------------------------------
// timing (sim only)
// ---------------------------------------------------------------------------------------------

/* This host's single-thread memcpy speed for 1 MiB copies out of 64 MiB buffers (from memory,
 * not from a cache, as the engine's copies are), bytes/s. */
static double memcpy_rate(void) {
  size_t n = 1 << 20, span = 64 << 20;
  char* a = malloc(span);
  char* b = malloc(span);
  memset(a, 1, span);
  memset(b, 2, span);
  int reps = 256;
  double t0 = now_s();
  for (int i = 0; i < reps; i++) {
    size_t off = (size_t)(i * 37 % 64) * n;
    memcpy(b + off, a + off, n);
  }
  double r = (double)n * reps / (now_s() - t0);
  free(a);
  free(b);
  return r;
}

static void section_timing(FILE* out, const char* spin) {
  double host = memcpy_rate();
  double bw = host / 2 < 55e9 ? host / 2 : 55e9; /* the model must be slower than the host */
  char spec[128];
  snprintf(spec, sizeof spec, "sim:1,h2d=%.0fMB/s,spin=%s", bw / 1e6, spin);
  tl_device_t* d = bench_device(spec);
  tl_stream_t* s;
  check(tl_stream_acquire(d, 0, &s), "stream");
  tl_staging_options_t o = {.device = d, .slot_bytes = 1 << 20, .slots = 1, .numa_node = -1};
  tl_staging_t* pool;
  check(tl_staging_init(&pool, &o), "staging");
  tl_staging_slot_t* slot;
  check(tl_staging_acquire(pool, -1, &slot), "slot");
  memset(slot->ptr, 7, 1 << 20);
  tl_dbuf_t* buf;
  check(tl_dbuf_alloc(s, 1 << 20, &buf), "alloc");
  tl_event_t* e;
  check(tl_event_init(d, 0, &e), "event");
  /* (a) throughput: 200 queued copies */
  int n = 200;
  tl_engine_stats_t a0, a1;
  check(tl_sim_engine_stats(d, TL_ENGINE_H2D, &a0), "stats");
  double t0 = now_s();
  for (int i = 0; i < n; i++) check(tl_copy_async(s, buf->ptr, slot->ptr, 1 << 20, TL_COPY_H2D), "copy");
  check(tl_event_record(e, s), "record");
  check(tl_event_wait(e, -1), "wait");
  double wall = now_s() - t0;
  check(tl_sim_engine_stats(d, TL_ENGINE_H2D, &a1), "stats");
  double model = (double)n * (1 << 20) / ((double)(uint64_t)(bw / 1e6) * 1e6);
  double busy = (double)(a1.busy_ns - a0.busy_ns) / 1e9;
  double late_mean = (double)(a1.late_ns - a0.late_ns) / n / 1e3;
  double late_max = (double)a1.late_max_ns / 1e3;
  /* (b) round trips of a 100 us kernel */
  int rt = 200;
  double r0 = now_s();
  for (int i = 0; i < rt; i++) {
    check(tl_kernel_async(s, 100000), "kernel");
    check(tl_event_record(e, s), "record");
    check(tl_event_wait(e, -1), "wait");
  }
  double per = (now_s() - r0) / rt * 1e6;
  printf("timing  spin=%-5s host memcpy %.1f GB/s, model h2d %.1f GB/s: 200 x 1 MiB copies took "
         "%.2f ms for %.2f ms modelled (%+.2f%%), engine busy %.2f ms; completions seen %.1f us "
         "late on average (max %.1f); a 100 us kernel round trip took %.1f us\n",
         spin, host / 1e9, bw / 1e9, wall * 1e3, model * 1e3, (wall / model - 1) * 100,
         busy * 1e3, late_mean, late_max, per);
  fprintf(out, "{\"spin\": \"%s\", \"host_memcpy_gbs\": %.2f, \"model_h2d_gbs\": %.2f, "
          "\"copies\": %d, \"wall_ms\": %.3f, \"model_ms\": %.3f, \"busy_ms\": %.3f, "
          "\"late_mean_us\": %.2f, \"late_max_us\": %.2f, \"kernel_us\": 100, "
          "\"roundtrip_us\": %.2f}", spin, host / 1e9, bw / 1e9, n, wall * 1e3, model * 1e3,
          busy * 1e3, late_mean, late_max, per);
  tl_event_close(e);
  tl_dbuf_free(buf);
  tl_staging_release(slot, NULL);
}

// ---------------------------------------------------------------------------------------------
// main: each section in a child process
// ---------------------------------------------------------------------------------------------

/* Runs fn in a forked child; its JSON fragment comes back through a pipe. */
static char* run_child(void (*fn)(FILE*, const char*), const char* arg) {
  int fds[2];
  if (pipe(fds) != 0) return NULL;
  fflush(NULL);
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    FILE* out = fdopen(fds[1], "w");
    fn(out, arg);
    fclose(out);
    fflush(NULL);
    _exit(0);
  }
  close(fds[1]);
  size_t cap = 1 << 16, len = 0;
  char* buf = malloc(cap);
  ssize_t r;
  while ((r = read(fds[0], buf + len, cap - len - 1)) > 0) len += (size_t)r;
  buf[len] = '\0';
  close(fds[0]);
  int status;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    free(buf);
    return NULL;
  }
  return buf;
}

static void launch_fn(FILE* out, const char* arg) {
  (void)arg;
  section_launch(out);
}
static void alloc_fn(FILE* out, const char* arg) {
  (void)arg;
  section_alloc(out);
}
static void timing_fn(FILE* out, const char* arg) { section_timing(out, arg); }

int main(int argc, char** argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  const char* sections = "launch,alloc,timing";
  const char* json = NULL;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--sections") == 0 && i + 1 < argc) sections = argv[++i];
    else if (strcmp(argv[i], "--json") == 0 && i + 1 < argc) json = argv[++i];
    else if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc) seconds = atof(argv[++i]);
    else if (strcmp(argv[i], "--cuda") == 0) use_cuda = 1;
    else if (strcmp(argv[i], "--devices") == 0 && i + 1 < argc) ndevices = atoi(argv[++i]);
    else if (strcmp(argv[i], "--spec") == 0 && i + 1 < argc) launch_spec = argv[++i];
    else if (strcmp(argv[i], "--pin") == 0 && i + 1 < argc) pin_loaders = atoi(argv[++i]);
    else if (strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      nthreads_list = 0;
      for (char* t = strtok(argv[++i], ","); t && nthreads_list < 8; t = strtok(NULL, ","))
        if ((threads_list[nthreads_list++] = atoi(t)) < 1 || threads_list[nthreads_list - 1] > 64) {
          fprintf(stderr, "tl-bench-device: --threads takes counts from 1 to 64, not '%s'\n", t);
          return 2;
        }
    } else {
      fprintf(stderr, "usage: tl-bench-device [--sections launch,alloc,timing] [--threads 1,2] "
                      "[--seconds S] [--cuda] [--devices N] [--spec SIM_SPEC] [--pin LOADERS] "
                      "[--json FILE]\n");
      return 2;
    }
  }
  if (use_cuda) {
    int n;
    int err = tl_cuda_device_count(&n);
    if (err) {
      printf("tl-bench-device: --cuda: no usable GPU (%s: %s)\n", tl_err_name(err), tl_err_detail());
      return 77;
    }
  }
  char* parts[8];
  int np = 0, failed = 0;
  if (strstr(sections, "launch")) {
    parts[np] = run_child(launch_fn, NULL);
    failed |= !parts[np++];
  }
  if (strstr(sections, "alloc")) {
    parts[np] = run_child(alloc_fn, NULL);
    failed |= !parts[np++];
  }
  if (strstr(sections, "timing") && !use_cuda) {
    char* a = run_child(timing_fn, "0us");
    char* b = run_child(timing_fn, "50us");
    failed |= !a || !b;
    size_t n = (a ? strlen(a) : 0) + (b ? strlen(b) : 0) + 32;
    parts[np] = malloc(n);
    snprintf(parts[np++], n, "\"timing\": [%s%s%s]", a ? a : "", a && b ? ", " : "", b ? b : "");
    free(a);
    free(b);
  }
  if (json) {
    FILE* f = fopen(json, "w");
    if (!f) {
      perror(json);
      return 1;
    }
    fprintf(f, "{\"backend\": \"%s\"", use_cuda ? "cuda" : "sim");
    for (int i = 0; i < np; i++)
      if (parts[i]) fprintf(f, ", %s", parts[i]);
    fprintf(f, "}\n");
    fclose(f);
  }
  for (int i = 0; i < np; i++) free(parts[i]);
  return failed ? 1 : 0;
}
