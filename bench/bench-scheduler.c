/* bench/bench-scheduler.c: empty C tasks per second through the worker pool.
 *
 *   tl-bench-scheduler [--workers N] [--scale S] [--reps R]
 *
 * For 1..N workers (default N: the CPUs this process may use) it measures three shapes, each
 * the best of R runs (default 3), from the first submit until tl_pool_close(pool, 0) returns
 * (every task has run and the workers are joined; starting the threads is not timed):
 *   tree    a binary tree of tasks: every task spawns two children into its own deque, so
 *           work spreads by stealing (depth 20 by default: 2M tasks; smaller with --scale)
 *   batch   one root task per worker, each spawning a batch of empty tasks into its own deque
 *           (idle workers steal from the spawners)
 *   inject  one outside thread submits empty tasks through the bounded injection queue
 *           (blocking submit: the producer meets backpressure when it outruns the workers)
 * and prints tasks per second in all and per worker ("per core": run with N <= cores). The
 * goal for the deque paths is >= 5M tasks/s per core. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <time.h>

#include "threadloom/threadloom.h"

static tl_pool_t* bench_pool; /* the pool under test (one at a time) */
static long batch_size;       /* tasks each batch root spawns */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void check(int rc, const char* what) {
  if (rc != 0) {
    fprintf(stderr, "%s: %s: %s (%s)\n", what, tl_err_name(rc), tl_strerror(rc), tl_err_detail());
    exit(1);
  }
}

static void empty_task(void* arg) { (void)arg; }

static void tree_task(void* arg) {
  uintptr_t depth = (uintptr_t)arg;
  if (depth == 0) return;
  check(tl_pool_submit(bench_pool, NULL, tree_task, NULL, (void*)(depth - 1)), "submit");
  check(tl_pool_submit(bench_pool, NULL, tree_task, NULL, (void*)(depth - 1)), "submit");
}

static void batch_root(void* arg) {
  (void)arg;
  for (long i = 0; i < batch_size; i++)
    check(tl_pool_submit(bench_pool, NULL, empty_task, NULL, NULL), "submit");
}

typedef enum { SHAPE_TREE, SHAPE_BATCH, SHAPE_INJECT } shape_t;
static const char* const shape_names[] = {"tree", "batch", "inject"};

/* Runs one shape on a fresh pool; returns tasks per second, *tasks the count. */
static double run_once(shape_t shape, int workers, double scale, long* tasks) {
  tl_pool_options_t o;
  tl_pool_options_default(&o);
  o.workers = workers;
  check(tl_pool_init(&bench_pool, &o), "tl_pool_init");
  double t0 = now_s();
  long n = 0;
  if (shape == SHAPE_TREE) {
    int depth = 20;
    while (depth > 10 && (double)(1L << (depth + 1)) > 2.1e6 * scale) depth--;
    n = (1L << (depth + 1)) - 1;
    check(tl_pool_submit(bench_pool, NULL, tree_task, NULL, (void*)(uintptr_t)depth), "submit");
  } else if (shape == SHAPE_BATCH) {
    batch_size = (long)(2e6 * scale) / workers;
    for (int w = 0; w < workers; w++) check(tl_pool_submit(bench_pool, NULL, batch_root, NULL, NULL), "submit");
    n = workers * (batch_size + 1);
  } else {
    n = (long)(1e6 * scale);
    for (long i = 0; i < n; i++) check(tl_pool_submit(bench_pool, NULL, empty_task, NULL, NULL), "submit");
  }
  check(tl_pool_close(bench_pool, 0), "tl_pool_close");
  double dt = now_s() - t0;
  *tasks = n;
  return (double)n / dt;
}

int main(int argc, char** argv) {
  cpu_set_t set;
  int max_workers = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
  double scale = 1.0;
  int reps = 3;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--workers") == 0 && i + 1 < argc) max_workers = atoi(argv[++i]);
    else if (strcmp(argv[i], "--scale") == 0 && i + 1 < argc) scale = atof(argv[++i]);
    else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) reps = atoi(argv[++i]);
    else {
      fprintf(stderr, "usage: %s [--workers N] [--scale S] [--reps R]\n", argv[0]);
      return 2;
    }
  }
  if (max_workers < 1 || reps < 1 || scale <= 0) {
    fprintf(stderr, "workers, reps and scale must be positive\n");
    return 2;
  }
  printf("threadloom %s scheduler benchmark: empty tasks, best of %d, %d CPU(s) allowed\n",
         tl_version_string(), reps, CPU_COUNT(&set));
  printf("%-7s %7s %10s %12s %14s\n", "shape", "workers", "tasks", "Mtasks/s", "Mtasks/s/core");
  for (int s = SHAPE_TREE; s <= SHAPE_INJECT; s++) {
    for (int w = 1; w <= max_workers; w++) {
      double best = 0;
      long n = 0;
      for (int r = 0; r < reps; r++) {
        double rate = run_once((shape_t)s, w, scale, &n);
        if (rate > best) best = rate;
      }
      printf("%-7s %7d %10ld %12.2f %14.2f\n", shape_names[s], w, n, best / 1e6, best / 1e6 / w);
    }
  }
  return 0;
}
