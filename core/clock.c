/* core/clock.c: the monotonic clock and condition variables that wait on it.
 *
 * Every timed wait in libthreadloom (the scheduler's parking and group waits, the injection
 * queue's backpressure, NCCL's polling) measures deadlines on CLOCK_MONOTONIC, so a change of
 * the wall clock never shortens or stretches a timeout. These helpers are the one place that
 * says so; the parts call them instead of one another. */
#include <time.h>

#include "core/internal.h"

int64_t tl__now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

struct timespec tl__timespec_of_ns(int64_t ns) {
  struct timespec ts = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
  return ts;
}

int tl__cond_init_monotonic(pthread_cond_t* c) {
  pthread_condattr_t a;
  int rc = pthread_condattr_init(&a);
  if (rc) return rc;
  rc = pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
  if (!rc) rc = pthread_cond_init(c, &a);
  pthread_condattr_destroy(&a);
  return rc;
}
