/* cudactx/stream.c: streams from per-thread pools, events, and the asynchronous operations,
 * over the device backend table (the same code for cuda and sim).
 *
 * Pools: each thread keeps the streams and events it released in a cache of its own (a short
 * list, at most TL__TCACHE entries of each) and takes from it first, so acquiring a stream or an
 * event touches nothing shared with other threads. Only when its cache has none does a thread
 * look in the device's list of spares (under the device's mutex) and only then create one in
 * the backend. When a thread exits, its cache goes to the devices' lists (a pthread key
 * destructor). Streams and events are never destroyed: a backend stream or event is reused for
 * the life of the process, which also keeps every handle ever returned valid memory.
 *
 * The operations are thin: check the arguments, call the table, translate a failure. They take
 * no lock of their own; the backends' own thread-safety applies (CUDA's and the sim's streams
 * and events are thread-safe on one object). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cudactx/internal.h"

#define TL__TCACHE 32 /* streams, and events, a thread keeps for itself */

typedef struct {
  tl_stream_t* streams; /* released by this thread, newest first */
  int nstreams;
  tl_event_t* events;
  int nevents;
  int registered;       /* the exit destructor knows this cache */
} tl__tcache_t;

static _Thread_local tl__tcache_t tl__tc;
static pthread_key_t tl__tc_key;
static pthread_once_t tl__tc_once = PTHREAD_ONCE_INIT;

static void tl__give_stream(tl_stream_t* s) {
  tl_device_t* d = s->dev;
  pthread_mutex_lock(&d->mu);
  s->next = d->free_streams;
  d->free_streams = s;
  pthread_mutex_unlock(&d->mu);
}

static void tl__give_event(tl_event_t* e) {
  tl_device_t* d = e->dev;
  pthread_mutex_lock(&d->mu);
  e->next = d->free_events;
  d->free_events = e;
  pthread_mutex_unlock(&d->mu);
}

/* At thread exit: everything the thread cached goes back to its device. */
static void tl__tc_exit(void* p) {
  tl__tcache_t* tc = p;
  while (tc->streams) {
    tl_stream_t* s = tc->streams;
    tc->streams = s->next;
    tl__give_stream(s);
  }
  while (tc->events) {
    tl_event_t* e = tc->events;
    tc->events = e->next;
    tl__give_event(e);
  }
  tc->nstreams = tc->nevents = 0;
}

static void tl__tc_key_init(void) { pthread_key_create(&tl__tc_key, tl__tc_exit); }

static tl__tcache_t* tl__tcache(void) {
  tl__tcache_t* tc = &tl__tc;
  if (!tc->registered) {
    pthread_once(&tl__tc_once, tl__tc_key_init);
    pthread_setspecific(tl__tc_key, tc);
    tc->registered = 1;
  }
  return tc;
}

/* Waits for a table query to stop answering NOT_READY, polling with a growing sleep (20 us to
 * 1 ms) for at most timeout_ms. Returns the query's last answer or TL__CUDA_NOT_READY. */
static int tl__poll(int (*query)(void*), void* h, int timeout_ms) {
  struct timespec t0, now;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  long sleep_ns = 20000;
  for (;;) {
    int rc = query(h);
    if (rc != TL__CUDA_NOT_READY) return rc;
    clock_gettime(CLOCK_MONOTONIC, &now);
    double ms = (double)(now.tv_sec - t0.tv_sec) * 1e3 + (double)(now.tv_nsec - t0.tv_nsec) / 1e6;
    if (ms >= timeout_ms) return TL__CUDA_NOT_READY;
    struct timespec ts = {0, sleep_ns};
    nanosleep(&ts, NULL);
    if (sleep_ns < 1000000) sleep_ns *= 2;
  }
}

// ---------------------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------------------

int tl_stream_acquire(tl_device_t* dev, int priority, tl_stream_t** out) {
  tl__clear_detail();
  if (!dev || !out) return tl__fail(TL_EINVAL, "tl_stream_acquire: NULL argument");
  *out = NULL;
  int lo = dev->props.priority_greatest, hi = dev->props.priority_least;
  int p = priority < lo ? lo : priority > hi ? hi : priority;
  tl__tcache_t* tc = tl__tcache();
  for (tl_stream_t **pp = &tc->streams, *s; (s = *pp) != NULL; pp = &s->next)
    if (s->dev == dev && s->priority == p) {
      *pp = s->next;
      tc->nstreams--;
      *out = s;
      break;
    }
  if (!*out) {
    pthread_mutex_lock(&dev->mu);
    for (tl_stream_t **pp = &dev->free_streams, *s; (s = *pp) != NULL; pp = &s->next)
      if (s->priority == p) {
        *pp = s->next;
        *out = s;
        break;
      }
    pthread_mutex_unlock(&dev->mu);
  }
  if (*out) {
    /* an error the previous user never collected is not the new user's: the query reports (and
     * on sim clears) it here */
    (*out)->api->stream_query((*out)->h);
    return 0;
  }
  tl_stream_t* s = calloc(1, sizeof *s);
  if (!s) return tl__fail(TL_ENOMEM, "tl_stream_acquire: a stream record");
  s->dev = dev;
  s->api = dev->api;
  s->priority = p;
  int rc = dev->api->stream_create(dev->ordinal, p, &s->h);
  if (rc) {
    free(s);
    return TL__DEV_ERR(dev, "cudaStreamCreateWithPriority", rc);
  }
  pthread_mutex_lock(&dev->mu);
  s->all_next = dev->all_streams;
  dev->all_streams = s;
  pthread_mutex_unlock(&dev->mu);
  *out = s;
  return 0;
}

void tl_stream_release(tl_stream_t* s) {
  if (!s) return;
  tl__tcache_t* tc = tl__tcache();
  if (tc->nstreams >= TL__TCACHE) {
    tl__give_stream(s);
    return;
  }
  s->next = tc->streams;
  tc->streams = s;
  tc->nstreams++;
}

tl_device_t* tl_stream_device(const tl_stream_t* s) { return s ? s->dev : NULL; }
int tl_stream_priority(const tl_stream_t* s) { return s ? s->priority : 0; }
void* tl_stream_handle(const tl_stream_t* s) {
  return s ? (s->api->stream_handle ? s->api->stream_handle(s->h) : s->h) : NULL;
}

int tl_stream_query(tl_stream_t* s) {
  tl__clear_detail();
  if (!s) return tl__fail(TL_EINVAL, "tl_stream_query: NULL stream");
  int rc = s->api->stream_query(s->h);
  if (rc == TL__CUDA_NOT_READY) return TL_EAGAIN;
  return TL__DEV_ERR(s->dev, "cudaStreamQuery", rc);
}

int tl_stream_sync(tl_stream_t* s, int timeout_ms) {
  tl__clear_detail();
  if (!s) return tl__fail(TL_EINVAL, "tl_stream_sync: NULL stream");
  if (timeout_ms < 0)
    return TL__DEV_ERR(s->dev, "cudaStreamSynchronize", s->api->stream_synchronize(s->h));
  int rc = tl__poll(s->api->stream_query, s->h, timeout_ms);
  if (rc == TL__CUDA_NOT_READY)
    return tl__fail(TL_ETIMEDOUT, "%s: the stream's work did not finish within %d ms",
                    s->dev->name, timeout_ms);
  return TL__DEV_ERR(s->dev, "cudaStreamQuery", rc);
}

int tl_stream_wait_event(tl_stream_t* s, tl_event_t* e) {
  tl__clear_detail();
  if (!s || !e) return tl__fail(TL_EINVAL, "tl_stream_wait_event: NULL argument");
  if (s->api != e->api)
    return tl__fail(TL_EINVAL, "tl_stream_wait_event: a %s stream cannot wait for a %s event",
                    s->dev->name, e->dev->name);
  return TL__DEV_ERR(s->dev, "cudaStreamWaitEvent", s->api->stream_wait_event(s->h, e->h));
}

int tl_device_sync(tl_device_t* dev) {
  tl__clear_detail();
  if (!dev) return tl__fail(TL_EINVAL, "tl_device_sync: NULL device");
  /* Streams are never removed from the list and are prepended: walking from the head read
   * under the lock visits every stream that existed then. */
  pthread_mutex_lock(&dev->mu);
  tl_stream_t* s = dev->all_streams;
  pthread_mutex_unlock(&dev->mu);
  int first = 0;
  for (; s; s = s->all_next) {
    int err = tl_stream_sync(s, -1);
    if (err && !first) first = err;
  }
  return first;
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

int tl_copy_async(tl_stream_t* s, void* dst, const void* src, size_t size, tl_copy_kind_t kind) {
  tl__detail[0] = '\0';
  if (!s || ((!dst || !src) && size))
    return tl__fail(TL_EINVAL, "tl_copy_async: NULL %s", !s ? "stream" : "buffer");
  if (kind != TL_COPY_H2D && kind != TL_COPY_D2H && kind != TL_COPY_D2D)
    return tl__fail(TL_EINVAL, "tl_copy_async: kind %d is not a tl_copy_kind_t", (int)kind);
  if (size == 0) return 0;
  int rc = s->api->memcpy_async(dst, src, size, (int)kind, s->h);
  return rc ? TL__DEV_ERR(s->dev, "cudaMemcpyAsync", rc) : 0;
}

int tl_memset_async(tl_stream_t* s, void* dst, int value, size_t size) {
  tl__detail[0] = '\0';
  if (!s || (!dst && size)) return tl__fail(TL_EINVAL, "tl_memset_async: NULL argument");
  if (size == 0) return 0;
  int rc = s->api->memset_async(dst, value, size, s->h);
  return rc ? TL__DEV_ERR(s->dev, "cudaMemsetAsync", rc) : 0;
}

int tl_kernel_async(tl_stream_t* s, uint64_t ns) {
  tl__detail[0] = '\0';
  if (!s) return tl__fail(TL_EINVAL, "tl_kernel_async: NULL stream");
  int rc = s->api->kernel_async(s->h, ns);
  return rc ? TL__DEV_ERR(s->dev, "cuLaunchKernel", rc) : 0;
}

int tl_stream_callback(tl_stream_t* s, void (*fn)(void* arg), void* arg) {
  tl__clear_detail();
  if (!s || !fn) return tl__fail(TL_EINVAL, "tl_stream_callback: NULL argument");
  int rc = s->api->launch_host_func(s->h, fn, arg);
  return rc ? TL__DEV_ERR(s->dev, "cudaLaunchHostFunc", rc) : 0;
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

int tl_event_init(tl_device_t* dev, unsigned flags, tl_event_t** out) {
  tl__detail[0] = '\0';
  if (!dev || !out) return tl__fail(TL_EINVAL, "tl_event_init: NULL argument");
  if (flags & ~(unsigned)TL_EVENT_TIMING)
    return tl__fail(TL_EINVAL, "tl_event_init: unknown flags 0x%x", flags);
  int timing = (flags & TL_EVENT_TIMING) != 0;
  *out = NULL;
  tl__tcache_t* tc = tl__tcache();
  tl_event_t* e = NULL;
  for (tl_event_t** pp = &tc->events; *pp; pp = &(*pp)->next)
    if ((*pp)->dev == dev && (*pp)->timing == timing) {
      e = *pp;
      *pp = e->next;
      tc->nevents--;
      break;
    }
  if (!e) {
    pthread_mutex_lock(&dev->mu);
    for (tl_event_t** pp = &dev->free_events; *pp; pp = &(*pp)->next)
      if ((*pp)->timing == timing) {
        e = *pp;
        *pp = e->next;
        break;
      }
    pthread_mutex_unlock(&dev->mu);
  }
  if (e) {
    /* An event whose last record carried an error would report it to its new owner: such
     * events are replaced by fresh ones. */
    int rc = e->api->event_query(e->h);
    if (rc == 0 || rc == TL__CUDA_NOT_READY) {
      *out = e;
      return 0;
    }
    e->api->event_destroy(e->h);
    free(e);
  }
  e = calloc(1, sizeof *e);
  if (!e) return tl__fail(TL_ENOMEM, "tl_event_init: an event record");
  e->dev = dev;
  e->api = dev->api;
  e->timing = timing;
  int rc = dev->api->event_create(dev->ordinal, timing, &e->h);
  if (rc) {
    free(e);
    return TL__DEV_ERR(dev, "cudaEventCreateWithFlags", rc);
  }
  *out = e;
  return 0;
}

/* A reused event keeps its last record: a new owner that waits before recording waits for
 * that old record, which has completed or will, and never for anything later. */
int tl_event_close(tl_event_t* e) {
  if (!e) return 0;
  tl__tcache_t* tc = tl__tcache();
  if (tc->nevents >= TL__TCACHE) {
    tl__give_event(e);
    return 0;
  }
  e->next = tc->events;
  tc->events = e;
  tc->nevents++;
  return 0;
}

int tl_event_record(tl_event_t* e, tl_stream_t* s) {
  tl__detail[0] = '\0';
  if (!e || !s) return tl__fail(TL_EINVAL, "tl_event_record: NULL argument");
  if (e->dev != s->dev)
    return tl__fail(TL_EINVAL, "tl_event_record: an event of %s recorded on a stream of %s",
                    e->dev->name, s->dev->name);
  int rc = s->api->event_record(e->h, s->h);
  return rc ? TL__DEV_ERR(s->dev, "cudaEventRecord", rc) : 0;
}

int tl_event_query(tl_event_t* e) {
  tl__detail[0] = '\0';
  if (!e) return tl__fail(TL_EINVAL, "tl_event_query: NULL event");
  int rc = e->api->event_query(e->h);
  if (rc == TL__CUDA_NOT_READY) return TL_EAGAIN;
  return rc ? TL__DEV_ERR(e->dev, "cudaEventQuery", rc) : 0;
}

int tl_event_wait(tl_event_t* e, int timeout_ms) {
  tl__clear_detail();
  if (!e) return tl__fail(TL_EINVAL, "tl_event_wait: NULL event");
  if (timeout_ms < 0)
    return TL__DEV_ERR(e->dev, "cudaEventSynchronize", e->api->event_synchronize(e->h));
  int rc = tl__poll(e->api->event_query, e->h, timeout_ms);
  if (rc == TL__CUDA_NOT_READY)
    return tl__fail(TL_ETIMEDOUT, "%s: the event did not complete within %d ms", e->dev->name,
                    timeout_ms);
  return TL__DEV_ERR(e->dev, "cudaEventQuery", rc);
}

int tl_event_wait_on(tl_event_t* e, tl_device_t* dev, void* handle) {
  tl__clear_detail();
  if (!e || !dev) return tl__fail(TL_EINVAL, "tl_event_wait_on: NULL argument");
  if (e->dev != dev)
    return tl__fail(TL_EINVAL, "tl_event_wait_on: an event of %s for a stream of %s",
                    e->dev->name, dev->name);
  return TL__DEV_ERR(dev, "cudaStreamWaitEvent",
                     dev->api->foreign_wait_event(dev->ordinal, handle, e->h));
}

int tl_event_record_on(tl_event_t* e, tl_device_t* dev, void* handle) {
  tl__detail[0] = '\0';
  if (!e || !dev) return tl__fail(TL_EINVAL, "tl_event_record_on: NULL argument");
  if (e->dev != dev)
    return tl__fail(TL_EINVAL, "tl_event_record_on: an event of %s on a stream of %s",
                    e->dev->name, dev->name);
  int rc = dev->api->foreign_event_record(dev->ordinal, handle, e->h);
  return rc ? TL__DEV_ERR(dev, "cudaEventRecord", rc) : 0;
}

int tl_event_elapsed(tl_event_t* start, tl_event_t* end, double* ms) {
  tl__clear_detail();
  if (!start || !end || !ms) return tl__fail(TL_EINVAL, "tl_event_elapsed: NULL argument");
  if (start->dev != end->dev)
    return tl__fail(TL_EINVAL, "tl_event_elapsed: events of %s and %s", start->dev->name,
                    end->dev->name);
  if (!start->timing || !end->timing)
    return tl__fail(TL_EINVAL, "tl_event_elapsed: both events need TL_EVENT_TIMING");
  float f = 0;
  int rc = start->api->event_elapsed(&f, start->h, end->h);
  if (rc == TL__CUDA_NOT_READY)
    return tl__fail(TL_EAGAIN, "tl_event_elapsed: a record has not completed yet");
  if (rc) return TL__DEV_ERR(start->dev, "cudaEventElapsedTime", rc);
  *ms = f;
  return 0;
}

tl_device_t* tl_event_device(const tl_event_t* e) { return e ? e->dev : NULL; }
