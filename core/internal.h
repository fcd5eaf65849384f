/* core/internal.h: helpers shared by every part of libthreadloom, never installed.
 * Internal non-static names use the tl__ prefix. */
#ifndef THREADLOOM_CORE_INTERNAL_H
#define THREADLOOM_CORE_INTERNAL_H

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
/* Copies at most cap-1 bytes of src into dst and terminates it; returns dst. */
char* tl__strlcpy(char* dst, const char* src, size_t cap);

#endif /* THREADLOOM_CORE_INTERNAL_H */
