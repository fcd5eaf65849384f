/* core/internal.h: helpers shared by every part of libthreadloom, never installed.
 * Internal non-static names use the tl__ prefix. */
#ifndef THREADLOOM_CORE_INTERNAL_H
#define THREADLOOM_CORE_INTERNAL_H

#include <pthread.h>
#include <stdint.h>
#include <time.h>

#include "threadloom/error.h"

/* Records the calling thread's failure detail (printf-style) and returns `err` unchanged, so a
 * failure path reads `return tl__fail(TL_ECUDA, "cudaMalloc: %s", name);`. */
int tl__fail(int err, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
/* Clears the calling thread's detail; called at the start of calls that may set one. */
void tl__clear_detail(void);
/* The calling thread's detail text, for hot paths that clear it inline (tl__detail[0] = '\0')
 * next to their own thread-locals: hidden thread-locals of one library share a single
 * __tls_get_addr call per function (the local-dynamic model), a call each otherwise. */
extern _Thread_local char tl__detail[512]
    __attribute__((visibility("hidden"), tls_model("local-dynamic")));
/* CLOCK_MONOTONIC now, in nanoseconds (core/clock.c): every deadline in the library is on it. */
int64_t tl__now_ns(void);
/* The timespec of a CLOCK_MONOTONIC time in nanoseconds, for pthread_cond_timedwait on a
 * condition variable made by tl__cond_init_monotonic. */
struct timespec tl__timespec_of_ns(int64_t ns);
/* Initialises a condition variable whose timed waits use CLOCK_MONOTONIC; returns a pthread
 * error. */
int tl__cond_init_monotonic(pthread_cond_t* c);
/* Copies at most cap-1 bytes of src into dst and terminates it; returns dst. */
char* tl__strlcpy(char* dst, const char* src, size_t cap);

#endif /* THREADLOOM_CORE_INTERNAL_H */
