/* bench/launch-loop.c: the raw C launch loop (see launch-loop.h). */
#include "launch-loop.h"

#include <string.h>
#include <time.h>

static double wall_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double cpu_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int tl_bench_launch_loop(tl_stream_t* s, double seconds, tl_bench_launch_t* out) {
  uint64_t n = 0;
  int err = 0;
  double c0 = cpu_s(), t0 = wall_s(), t;
  do {
    for (int i = 0; i < 1024; i++) err |= tl_kernel_async(s, 0);
    n += 1024;
    t = wall_s();
  } while (t - t0 < seconds && !err);
  double c1 = cpu_s();
  int sync = tl_stream_sync(s, -1);
  double wall = wall_s() - t0;
  out->ops = n;
  out->ops_per_s = (double)n / wall;
  out->ops_per_cpu_s = (double)n / (c1 - c0 > 1e-9 ? c1 - c0 : 1e-9);
  if (err) return tl_kernel_async(s, 0); /* the code (errors are sticky per stream) */
  return sync;
}

int tl_bench_launch(const char* kind, int index, double seconds, double* ops_per_s,
                    double* ops_per_cpu_s) {
  tl_device_kind_t k = kind && strcmp(kind, "cuda") == 0 ? TL_DEVICE_CUDA : TL_DEVICE_SIM;
  tl_device_t* d;
  int err = tl_device_get(k, index, &d);
  if (err) return err;
  tl_stream_t* s;
  if ((err = tl_stream_acquire(d, 0, &s))) return err;
  for (int i = 0; i < 1000 && !err; i++) err = tl_kernel_async(s, 0);
  if (!err) err = tl_stream_sync(s, -1);
  tl_bench_launch_t r = {0};
  if (!err) err = tl_bench_launch_loop(s, seconds, &r);
  tl_stream_release(s);
  *ops_per_s = r.ops_per_s;
  *ops_per_cpu_s = r.ops_per_cpu_s;
  return err;
}
