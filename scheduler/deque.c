/* scheduler/deque.c: the per-worker deques and the bounded injection queue.
 *
 * Both are rings of tasks stored by value (no allocation per task) under one mutex each. A
 * mutex per deque is uncontended in the common case (the owner pushing and popping its own
 * work), costs about as much as the fences of a lock-free Chase-Lev deque on x86, and keeps
 * ThreadSanitizer able to check every access. The owner works at the bottom (LIFO: the task it
 * just spawned is hot in its cache), thieves at the top (FIFO: the oldest task, in a recursive
 * computation the biggest).
 *
 * Invariants: top <= bottom, bottom - top <= mask + 1; the atomic `size` mirrors bottom - top
 * (resp. count) and is only stored under the mutex, so a read without the mutex is a hint that
 * may be stale but is never torn; a stale hint costs one lock, never a lost task, because
 * emptiness is decided again under the mutex. A push stores `size` seq_cst: it is the
 * submitter's half of the parking handshake described in pool.c (takes may store relaxed: a
 * smaller size never has to wake anyone). Batches: a thief takes up to half of a victim's
 * deque, a worker up to its share of the injection queue, in one lock, and moves all but one
 * into its own deque (tl__deque_reserve first, so that move cannot fail and no taken task is
 * ever held where it cannot be pushed). The injection queue's `closed` flag is
 * set under its mutex, so a put either lands before close (and is drained) or is refused. */
#include <assert.h>
#include <stdlib.h>
#include <string.h>

#include "scheduler/internal.h"

/* The injection queue's mutex guards a few loads and stores and is where outside submitters
 * and takers meet: an adaptive mutex (glibc) spins briefly on contention before sleeping in
 * the kernel, so a taker meeting the submitter inside its critical section waits a few hundred
 * cycles instead of paying a futex wait and wake (measured: about 1.5x on the inject shape).
 * The deques keep the default mutex: mostly uncontended, and measured slightly faster there. */
static int tl__queue_mutex_init(pthread_mutex_t* mu) {
#ifdef PTHREAD_ADAPTIVE_MUTEX_INITIALIZER_NP
  pthread_mutexattr_t a;
  int rc = pthread_mutexattr_init(&a);
  if (rc) return rc;
  rc = pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ADAPTIVE_NP);
  if (!rc) rc = pthread_mutex_init(mu, &a);
  pthread_mutexattr_destroy(&a);
  return rc;
#else
  return pthread_mutex_init(mu, NULL);
#endif
}

// ---------------------------------------------------------------------------------------------
// Worker deque
// ---------------------------------------------------------------------------------------------

int tl__deque_init(tl__deque_t* d, size_t capacity) {
  memset(d, 0, sizeof *d);
  size_t cap = 16;
  while (cap < capacity) cap *= 2;
  d->buf = malloc(cap * sizeof *d->buf);
  if (!d->buf) return TL_ENOMEM;
  int rc = pthread_mutex_init(&d->mu, NULL);
  if (rc) {
    free(d->buf);
    d->buf = NULL;
    return tl_translate_sys_error(rc);
  }
  d->mask = cap - 1;
  atomic_init(&d->size, 0);
  return 0;
}

void tl__deque_destroy(tl__deque_t* d) {
  if (!d->buf) return;
  pthread_mutex_destroy(&d->mu);
  free(d->buf);
  d->buf = NULL;
}

/* Doubles the ring, keeping indexes (the tasks move to their slots in the larger ring). */
static int tl__deque_grow(tl__deque_t* d) {
  size_t cap = d->mask + 1, ncap = cap * 2;
  tl__task_t* nb = malloc(ncap * sizeof *nb);
  if (!nb) return TL_ENOMEM;
  for (size_t i = d->top; i != d->bottom; i++) nb[i & (ncap - 1)] = d->buf[i & d->mask];
  free(d->buf);
  d->buf = nb;
  d->mask = ncap - 1;
  return 0;
}

int tl__deque_push(tl__deque_t* d, const tl__task_t* t) {
  pthread_mutex_lock(&d->mu);
  if (d->bottom - d->top > d->mask) {
    int rc = tl__deque_grow(d);
    if (rc) {
      pthread_mutex_unlock(&d->mu);
      return rc;
    }
  }
  d->buf[d->bottom & d->mask] = *t;
  d->bottom++;
  atomic_store(&d->size, d->bottom - d->top); /* seq_cst: the parking handshake (pool.c) */
  pthread_mutex_unlock(&d->mu);
  return 0;
}

bool tl__deque_pop(tl__deque_t* d, tl__task_t* out) {
  if (atomic_load_explicit(&d->size, memory_order_relaxed) == 0) return false;
  pthread_mutex_lock(&d->mu);
  bool ok = d->bottom != d->top;
  if (ok) {
    d->bottom--;
    *out = d->buf[d->bottom & d->mask];
    atomic_store_explicit(&d->size, d->bottom - d->top, memory_order_relaxed);
  }
  pthread_mutex_unlock(&d->mu);
  return ok;
}

int tl__deque_reserve(tl__deque_t* d, size_t n) {
  int rc = 0;
  pthread_mutex_lock(&d->mu);
  while (!rc && d->mask + 1 - (d->bottom - d->top) < n) rc = tl__deque_grow(d);
  pthread_mutex_unlock(&d->mu);
  return rc;
}

void tl__deque_push_rev(tl__deque_t* d, const tl__task_t* t, size_t n) {
  pthread_mutex_lock(&d->mu);
  assert(d->mask + 1 - (d->bottom - d->top) >= n); /* tl__deque_reserve made room */
  for (size_t i = n; i-- > 0;) d->buf[d->bottom++ & d->mask] = t[i];
  atomic_store(&d->size, d->bottom - d->top); /* seq_cst: the parking handshake (pool.c) */
  pthread_mutex_unlock(&d->mu);
}

size_t tl__deque_steal_batch(tl__deque_t* d, tl__task_t* out, size_t max) {
  if (atomic_load_explicit(&d->size, memory_order_relaxed) == 0) return 0;
  pthread_mutex_lock(&d->mu);
  size_t n = (d->bottom - d->top + 1) / 2; /* half, rounded up: the owner keeps the rest */
  if (n > max) n = max;
  for (size_t i = 0; i < n; i++) out[i] = d->buf[d->top++ & d->mask];
  atomic_store_explicit(&d->size, d->bottom - d->top, memory_order_relaxed);
  pthread_mutex_unlock(&d->mu);
  return n;
}

bool tl__deque_steal(tl__deque_t* d, tl__task_t* out) {
  if (atomic_load_explicit(&d->size, memory_order_relaxed) == 0) return false;
  pthread_mutex_lock(&d->mu);
  bool ok = d->bottom != d->top;
  if (ok) {
    *out = d->buf[d->top & d->mask];
    d->top++;
    atomic_store_explicit(&d->size, d->bottom - d->top, memory_order_relaxed);
  }
  pthread_mutex_unlock(&d->mu);
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Injection queue
// ---------------------------------------------------------------------------------------------

int tl__inject_init(tl__inject_t* q, size_t cap) {
  memset(q, 0, sizeof *q);
  q->buf = malloc(cap * sizeof *q->buf);
  if (!q->buf) return TL_ENOMEM;
  int rc = tl__queue_mutex_init(&q->mu);
  if (rc) {
    free(q->buf);
    q->buf = NULL;
    return tl_translate_sys_error(rc);
  }
  rc = tl__cond_init_monotonic(&q->not_full);
  if (rc) {
    pthread_mutex_destroy(&q->mu);
    free(q->buf);
    q->buf = NULL;
    return tl_translate_sys_error(rc);
  }
  q->cap = cap;
  atomic_init(&q->size, 0);
  atomic_init(&q->accepted, 0);
  return 0;
}

void tl__inject_destroy(tl__inject_t* q) {
  if (!q->buf) return;
  pthread_cond_destroy(&q->not_full);
  pthread_mutex_destroy(&q->mu);
  free(q->buf);
  q->buf = NULL;
}

int tl__inject_put(tl__inject_t* q, const tl__task_t* t, bool wait) {
  pthread_mutex_lock(&q->mu);
  while (!q->closed && q->count == q->cap) {
    if (!wait) {
      pthread_mutex_unlock(&q->mu);
      return TL_EAGAIN;
    }
    q->blocked++;
    pthread_cond_wait(&q->not_full, &q->mu);
    q->blocked--;
  }
  if (q->closed) {
    pthread_mutex_unlock(&q->mu);
    return TL_ECLOSED;
  }
  size_t tail = q->head + q->count;
  q->buf[tail < q->cap ? tail : tail - q->cap] = *t;
  q->count++;
  atomic_store_explicit(&q->accepted, atomic_load_explicit(&q->accepted, memory_order_relaxed) + 1,
                        memory_order_relaxed);
  atomic_store(&q->size, q->count); /* seq_cst: the parking handshake (pool.c) */
  pthread_mutex_unlock(&q->mu);
  return 0;
}

size_t tl__inject_take_batch(tl__inject_t* q, tl__task_t* out, size_t max, size_t share) {
  if (atomic_load_explicit(&q->size, memory_order_relaxed) == 0) return 0;
  pthread_mutex_lock(&q->mu);
  size_t n = (q->count + share - 1) / share; /* this taker's share, rounded up */
  if (n > max) n = max;
  for (size_t i = 0; i < n; i++) {
    out[i] = q->buf[q->head];
    q->head = q->head + 1 == q->cap ? 0 : q->head + 1;
  }
  q->count -= n;
  atomic_store_explicit(&q->size, q->count, memory_order_relaxed);
  /* Blocked submitters resume once the queue is half empty, not at every free slot: a full
   * queue then refills in runs instead of one futex wake per take (the hysteresis keeps the
   * producer and the takers off each other's mutex). Every take at or below half signals
   * again while someone is blocked, so no submitter is left waiting beside free slots. */
  if (n && q->blocked && q->count <= q->cap / 2) pthread_cond_signal(&q->not_full);
  pthread_mutex_unlock(&q->mu);
  return n;
}

bool tl__inject_take(tl__inject_t* q, tl__task_t* out) { return tl__inject_take_batch(q, out, 1, 1) == 1; }

bool tl__inject_close(tl__inject_t* q) {
  pthread_mutex_lock(&q->mu);
  bool was = q->closed;
  q->closed = true;
  pthread_cond_broadcast(&q->not_full);
  pthread_mutex_unlock(&q->mu);
  return !was;
}
