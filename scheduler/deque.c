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
 * smaller size never has to wake anyone). The injection queue's `closed` flag is
 * set under its mutex, so a put either lands before close (and is drained) or is refused. */
#include <stdlib.h>
#include <string.h>

#include "scheduler/internal.h"

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
  int rc = pthread_mutex_init(&q->mu, NULL);
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
  q->buf[(q->head + q->count) % q->cap] = *t;
  q->count++;
  atomic_store(&q->size, q->count); /* seq_cst: the parking handshake (pool.c) */
  pthread_mutex_unlock(&q->mu);
  return 0;
}

bool tl__inject_take(tl__inject_t* q, tl__task_t* out) {
  if (atomic_load_explicit(&q->size, memory_order_relaxed) == 0) return false;
  pthread_mutex_lock(&q->mu);
  bool ok = q->count > 0;
  if (ok) {
    *out = q->buf[q->head];
    q->head = (q->head + 1) % q->cap;
    q->count--;
    atomic_store_explicit(&q->size, q->count, memory_order_relaxed);
    if (q->blocked) pthread_cond_signal(&q->not_full);
  }
  pthread_mutex_unlock(&q->mu);
  return ok;
}

bool tl__inject_close(tl__inject_t* q) {
  pthread_mutex_lock(&q->mu);
  bool was = q->closed;
  q->closed = true;
  pthread_cond_broadcast(&q->not_full);
  pthread_mutex_unlock(&q->mu);
  return !was;
}
