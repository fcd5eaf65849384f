/* bench/bench-scheduler.c: empty C tasks per second through the worker pool, against the
 * textbook thread pool.
 *
 *   tl-bench-scheduler [--threads 1,2,4,8] [--workers N] [--scale S] [--reps R] [--json FILE]
 *                      [--shapes tree,batch,inject] [--impl both|tl|base]
 *
 * For each worker count of the sweep (default 1, 2, 4, 8 and the CPUs this process may use, up
 * to 16: past the core count the curve shows oversubscription) it measures three shapes, each
 * the best of R runs (default 3), from the first submit until every task has run and the
 * workers are joined (starting the threads is not timed):
 *   tree    a binary tree of tasks: every task spawns two children (depth 20 by default: 2M
 *           tasks; smaller with --scale); in the pool they go to the worker's own deque and
 *           spread by stealing
 *   batch   one root task per worker, each spawning a batch of empty tasks
 *   inject  one outside thread submits empty tasks (in the pool through the bounded injection
 *           queue, blocking: the producer meets backpressure when it outruns the workers)
 * and prints tasks per second in all and per worker ("per core": N <= cores). The goal for the
 * deque paths is >= 5M tasks/s per core.
 *
 * The baseline, measured in the same run with the same shapes: a pool of N pthreads sharing one
 * FIFO queue (a ring) under one mutex and condition variable, what a C program without a
 * work-stealing runtime writes. To keep the comparison honest it does what the pool does: its
 * task is the pool's 32-byte task (fn, cancel, arg, group), every task is a call through a
 * pointer on a worker thread, a submit from outside the pool blocks while the outside queue
 * holds inject_capacity (1024) tasks (the pool's bounded injection queue and its backpressure;
 * submits from workers never block, as the pool's go to unbounded deques, else a full queue
 * would deadlock the tree), and both sides count the tasks their workers actually ran
 * (thread-local counts summed as the workers stop): a run whose count differs from the shape's
 * task count aborts the benchmark. --json FILE also writes every row as JSON (bench/report.py;
 * each row's "runs" keeps every rep's rate beside the best, for the report's spread);
 * --shapes and --impl pick a subset (for profiling one side with perf). */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "threadloom/threadloom.h"

#define MAX_SWEEP 16

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die(const char* what) {
  fprintf(stderr, "tl-bench-scheduler: %s\n", what);
  exit(1);
}

static void check(int rc, const char* what) {
  if (rc != 0) {
    fprintf(stderr, "%s: %s: %s (%s)\n", what, tl_err_name(rc), tl_strerror(rc), tl_err_detail());
    exit(1);
  }
}

// ---------------------------------------------------------------------------------------------
// The baseline: N pthreads, one mutex-protected FIFO queue
// ---------------------------------------------------------------------------------------------

/* The same size as the pool's task (scheduler/internal.h): the copy in and out is the same. */
typedef struct {
  tl_task_fn fn;     /* the task */
  tl_task_fn cancel; /* unused, as the pool's NULL cancel */
  void* arg;         /* its argument */
  void* group;       /* unused, as the pool's NULL group */
} base_task_t;

#define BASE_CAP 1024 /* bound for submits from outside threads: the pool's default injection capacity */

typedef struct {
  pthread_mutex_t lock;  /* guards every field below */
  pthread_cond_t work;   /* signalled on push and on close */
  pthread_cond_t not_full; /* signalled when a take leaves room for a blocked outside submit */
  pthread_cond_t idle;   /* signalled when pending drops to 0 */
  base_task_t* ring;     /* FIFO ring of cap entries, grown by doubling */
  size_t cap, head, len; /* ring capacity, index of the oldest entry, entries queued */
  long pending;          /* tasks queued or running */
  int blocked;           /* outside submitters waiting in not_full */
  int closing;           /* set once pending reached 0 in base_close: workers exit */
  int nthreads;          /* workers started */
  pthread_t threads[64]; /* the workers */
} base_pool_t;

static _Thread_local int base_is_worker; /* the calling thread is a baseline worker */
static _Thread_local long tasks_run;      /* tasks this thread ran (either pool) */
static _Atomic long tasks_total;          /* the workers' tasks_run, added as they stop */

/* Adds the calling worker's count to tasks_total (the pool's on_stop hook; the baseline's exit). */
static void count_stop(void* ud, int worker) {
  (void)ud;
  (void)worker;
  atomic_fetch_add(&tasks_total, tasks_run);
  tasks_run = 0;
}

static void base_submit(base_pool_t* p, tl_task_fn fn, void* arg) {
  pthread_mutex_lock(&p->lock);
  if (!base_is_worker) /* backpressure on outside threads, as the pool's injection queue */
    while (p->len >= BASE_CAP) {
      p->blocked++;
      pthread_cond_wait(&p->not_full, &p->lock);
      p->blocked--;
    }
  if (p->len == p->cap) { /* grow: unwrap the ring into twice the space */
    base_task_t* r = malloc(2 * p->cap * sizeof *r);
    if (!r) die("baseline queue: out of memory");
    for (size_t i = 0; i < p->len; i++) r[i] = p->ring[(p->head + i) % p->cap];
    free(p->ring);
    p->ring = r;
    p->head = 0;
    p->cap *= 2;
  }
  p->ring[(p->head + p->len) % p->cap] = (base_task_t){fn, NULL, arg, NULL};
  p->len++;
  p->pending++;
  pthread_cond_signal(&p->work);
  pthread_mutex_unlock(&p->lock);
}

static void* base_worker(void* arg) {
  base_pool_t* p = arg;
  base_is_worker = 1;
  pthread_mutex_lock(&p->lock);
  for (;;) {
    while (p->len == 0 && !p->closing) pthread_cond_wait(&p->work, &p->lock);
    if (p->len == 0) break; /* closing and drained */
    base_task_t t = p->ring[p->head];
    p->head = (p->head + 1) % p->cap;
    p->len--;
    if (p->blocked && p->len < BASE_CAP) pthread_cond_signal(&p->not_full);
    pthread_mutex_unlock(&p->lock);
    t.fn(t.arg);
    pthread_mutex_lock(&p->lock);
    if (--p->pending == 0) pthread_cond_broadcast(&p->idle);
  }
  pthread_mutex_unlock(&p->lock);
  count_stop(NULL, 0);
  return NULL;
}

static void base_init(base_pool_t* p, int workers) {
  memset(p, 0, sizeof *p);
  pthread_mutex_init(&p->lock, NULL);
  pthread_cond_init(&p->work, NULL);
  pthread_cond_init(&p->not_full, NULL);
  pthread_cond_init(&p->idle, NULL);
  p->cap = 1024;
  p->ring = malloc(p->cap * sizeof *p->ring);
  if (!p->ring) die("baseline queue: out of memory");
  for (int i = 0; i < workers; i++)
    if (pthread_create(&p->threads[i], NULL, base_worker, p) != 0) die("pthread_create failed");
  p->nthreads = workers;
}

/* Waits until every task (and every task they spawned) has run, then joins the workers. */
static void base_close(base_pool_t* p) {
  pthread_mutex_lock(&p->lock);
  while (p->pending > 0) pthread_cond_wait(&p->idle, &p->lock);
  p->closing = 1;
  pthread_cond_broadcast(&p->work);
  pthread_mutex_unlock(&p->lock);
  for (int i = 0; i < p->nthreads; i++) pthread_join(p->threads[i], NULL);
  free(p->ring);
  pthread_mutex_destroy(&p->lock);
  pthread_cond_destroy(&p->work);
  pthread_cond_destroy(&p->not_full);
  pthread_cond_destroy(&p->idle);
}

// ---------------------------------------------------------------------------------------------
// The shapes, on either pool
// ---------------------------------------------------------------------------------------------

typedef enum { IMPL_POOL, IMPL_BASE } impl_t;
static const char* const impl_names[] = {"threadloom", "baseline"};

static impl_t bench_impl;     /* the pool under test (one run at a time) */
static tl_pool_t* bench_pool; /* when IMPL_POOL */
static base_pool_t base_pool; /* when IMPL_BASE */
static long batch_size;       /* tasks each batch root spawns */

static void submit(tl_task_fn fn, void* arg) {
  if (bench_impl == IMPL_POOL) check(tl_pool_submit(bench_pool, NULL, fn, NULL, arg), "submit");
  else base_submit(&base_pool, fn, arg);
}

/* Every task body starts by counting itself (a plain thread-local increment, on both sides). */
static void empty_task(void* arg) {
  (void)arg;
  tasks_run++;
}

static void tree_task(void* arg) {
  tasks_run++;
  uintptr_t depth = (uintptr_t)arg;
  if (depth == 0) return;
  submit(tree_task, (void*)(depth - 1));
  submit(tree_task, (void*)(depth - 1));
}

static void batch_root(void* arg) {
  (void)arg;
  tasks_run++;
  for (long i = 0; i < batch_size; i++) submit(empty_task, NULL);
}

typedef enum { SHAPE_TREE, SHAPE_BATCH, SHAPE_INJECT } shape_t;
static const char* const shape_names[] = {"tree", "batch", "inject"};

/* Runs one shape on a fresh pool of `impl`; returns tasks per second, *tasks the count. */
static double run_once(impl_t impl, shape_t shape, int workers, double scale, long* tasks) {
  bench_impl = impl;
  if (impl == IMPL_POOL) {
    tl_pool_options_t o;
    tl_pool_options_default(&o);
    o.workers = workers;
    o.on_stop = count_stop;
    check(tl_pool_init(&bench_pool, &o), "tl_pool_init");
  } else {
    base_init(&base_pool, workers);
  }
  atomic_store(&tasks_total, 0);
  double t0 = now_s();
  long n = 0;
  if (shape == SHAPE_TREE) {
    int depth = 20;
    while (depth > 10 && (double)(1L << (depth + 1)) > 2.1e6 * scale) depth--;
    n = (1L << (depth + 1)) - 1;
    submit(tree_task, (void*)(uintptr_t)depth);
  } else if (shape == SHAPE_BATCH) {
    batch_size = (long)(2e6 * scale) / workers;
    for (int w = 0; w < workers; w++) submit(batch_root, NULL);
    n = workers * (batch_size + 1);
  } else {
    n = (long)(1e6 * scale);
    for (long i = 0; i < n; i++) submit(empty_task, NULL);
  }
  if (impl == IMPL_POOL) check(tl_pool_close(bench_pool, 0), "tl_pool_close");
  else base_close(&base_pool);
  double dt = now_s() - t0;
  long ran = atomic_load(&tasks_total);
  if (ran != n) {
    fprintf(stderr, "tl-bench-scheduler: %s %s with %d workers ran %ld tasks, expected %ld\n",
            impl_names[impl], shape_names[shape], workers, ran, n);
    exit(1);
  }
  *tasks = n;
  return (double)n / dt;
}

// ---------------------------------------------------------------------------------------------
// Arguments, the table and the JSON
// ---------------------------------------------------------------------------------------------

static void usage(const char* argv0) {
  fprintf(stderr, "usage: %s [--threads 1,2,4,8] [--workers N] [--scale S] [--reps R] "
                  "[--json FILE] [--shapes tree,batch,inject] [--impl both|tl|base]\n"
                  "  --workers N measures 1..N; thread counts are 1..64\n", argv0);
  exit(2);
}

static int parse_threads(const char* s, int* out) {
  int n = 0;
  char buf[256];
  snprintf(buf, sizeof buf, "%s", s);
  for (char* tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
    int v = atoi(tok);
    if (v < 1 || v > 64 || n == MAX_SWEEP) return -1;
    out[n++] = v;
  }
  return n;
}

int main(int argc, char** argv) {
  cpu_set_t set;
  int cores = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
  int sweep[MAX_SWEEP], nsweep = 0;
  double scale = 1.0;
  int reps = 3;
  const char* json_path = NULL;
  int shape_on[3] = {1, 1, 1}, impl_on[2] = {1, 1};
  /* default sweep: 1, 2, 4, ... up to max(8, cores) and never above 16, plus the core count */
  int top = cores > 8 ? (cores < 16 ? cores : 16) : 8;
  for (int w = 1; w <= top; w *= 2) sweep[nsweep++] = w;
  if (cores <= 16 && (cores & (cores - 1)) != 0) sweep[nsweep++] = cores;
  for (int i = 1; i < argc; i++) {
    if (i + 1 >= argc) usage(argv[0]);
    if (strcmp(argv[i], "--workers") == 0) {
      int n = atoi(argv[++i]);
      if (n < 1 || n > MAX_SWEEP) usage(argv[0]);
      for (nsweep = 0; nsweep < n; nsweep++) sweep[nsweep] = nsweep + 1;
    } else if (strcmp(argv[i], "--threads") == 0) {
      if ((nsweep = parse_threads(argv[++i], sweep)) <= 0) usage(argv[0]);
    } else if (strcmp(argv[i], "--scale") == 0) scale = atof(argv[++i]);
    else if (strcmp(argv[i], "--reps") == 0) reps = atoi(argv[++i]);
    else if (strcmp(argv[i], "--json") == 0) json_path = argv[++i];
    else if (strcmp(argv[i], "--shapes") == 0) {
      const char* v = argv[++i];
      for (int k = 0; k < 3; k++) shape_on[k] = strstr(v, shape_names[k]) != NULL;
      if (!shape_on[0] && !shape_on[1] && !shape_on[2]) usage(argv[0]);
    } else if (strcmp(argv[i], "--impl") == 0) {
      const char* v = argv[++i];
      if (strcmp(v, "both") && strcmp(v, "tl") && strcmp(v, "base")) usage(argv[0]);
      impl_on[IMPL_POOL] = strcmp(v, "base") != 0;
      impl_on[IMPL_BASE] = strcmp(v, "tl") != 0;
    } else usage(argv[0]);
  }
  if (reps < 1 || scale <= 0) {
    fprintf(stderr, "reps and scale must be positive\n");
    return 2;
  }
  FILE* js = NULL;
  if (json_path && !(js = fopen(json_path, "w"))) {
    perror(json_path);
    return 1;
  }
  printf("threadloom %s scheduler benchmark: empty tasks, best of %d, %d CPU(s) allowed\n"
         "baseline: N pthreads sharing one FIFO queue under a mutex + condition variable\n",
         tl_version_string(), reps, cores);
  printf("%-7s %7s %10s %12s %14s %14s %9s\n", "shape", "workers", "tasks", "Mtasks/s",
         "Mtasks/s/core", "base Mtasks/s", "tl/base");
  if (js) fprintf(js, "{\"cores\": %d, \"reps\": %d, \"scale\": %g, \"rows\": [", cores, reps, scale);
  int first = 1;
  for (int s = SHAPE_TREE; s <= SHAPE_INJECT; s++) {
    if (!shape_on[s]) continue;
    for (int k = 0; k < nsweep; k++) {
      int w = sweep[k];
      double best[2] = {0, 0};
      double* runs[2] = {calloc((size_t)reps, sizeof(double)), calloc((size_t)reps, sizeof(double))};
      if (!runs[0] || !runs[1]) {
        fprintf(stderr, "out of memory\n");
        return 1;
      }
      long n = 0;
      for (int r = 0; r < reps; r++)
        for (int impl = IMPL_POOL; impl <= IMPL_BASE; impl++) { /* alternate: drift hits both */
          if (!impl_on[impl]) continue;
          double rate = run_once((impl_t)impl, (shape_t)s, w, scale, &n);
          runs[impl][r] = rate;
          if (rate > best[impl]) best[impl] = rate;
        }
      printf("%-7s %7d %10ld %12.2f %14.2f %14.2f %8.2fx%s\n", shape_names[s], w, n,
             best[0] / 1e6, best[0] / 1e6 / (w < cores ? w : cores), best[1] / 1e6,
             best[1] > 0 ? best[0] / best[1] : 0.0, w > cores ? " (>cores)" : "");
      fflush(stdout);
      if (js) {
        fprintf(js, "%s\n  {\"shape\": \"%s\", \"workers\": %d, \"tasks\": %ld, \"%s\": %.1f, "
                    "\"%s\": %.1f, \"runs\": {", first ? "" : ",", shape_names[s], w, n,
                impl_names[0], best[0], impl_names[1], best[1]);
        for (int impl = IMPL_POOL; impl <= IMPL_BASE; impl++) { /* every rep's rate: the spread */
          fprintf(js, "%s\"%s\": [", impl == IMPL_POOL ? "" : ", ", impl_names[impl]);
          for (int r = 0; r < reps; r++) fprintf(js, "%s%.1f", r ? ", " : "", runs[impl][r]);
          fprintf(js, "]");
        }
        fprintf(js, "}}");
        first = 0;
      }
      free(runs[0]);
      free(runs[1]);
    }
  }
  if (js) {
    fprintf(js, "\n]}\n");
    if (fclose(js) != 0) {
      perror(json_path);
      return 1;
    }
  }
  return 0;
}
