/* bench/launch-loop.h: the raw C launch loop of the launch-rate benchmarks, shared by
 * tl-bench-device (C threads) and bench/bench_devices.py (Python threads calling it through
 * ctypes from tl-bench-launch.so, in the same process as their Python launches: the same sim
 * configuration, pinning and loader threads). */
#ifndef THREADLOOM_BENCH_LAUNCH_LOOP_H
#define THREADLOOM_BENCH_LAUNCH_LOOP_H
#include <stdint.h>

#include "threadloom/threadloom.h"

typedef struct {
  uint64_t ops;         /* launches made in the measured interval */
  double ops_per_s;     /* per second of wall-clock time */
  double ops_per_cpu_s; /* per second of the calling thread's own CPU time */
} tl_bench_launch_t;

/* Launches 0 ns kernels on s back to back, in batches of 1024, for `seconds`, then waits for
 * the stream. 0 or the first failure's TL_E* code. */
int tl_bench_launch_loop(tl_stream_t* s, double seconds, tl_bench_launch_t* out);

/* For ctypes: takes a pooled stream of device `kind` ("sim" or "cuda") `index`, warms it up
 * (1000 launches, synchronized), runs tl_bench_launch_loop and gives the stream back. 0 or a
 * TL_E* code (tl_err_detail() says more). */
TL_EXTERN int tl_bench_launch(const char* kind, int index, double seconds, double* ops_per_s,
                              double* ops_per_cpu_s);

#endif /* THREADLOOM_BENCH_LAUNCH_LOOP_H */
