/* scheduler/group.c: task groups, waiting for them, and canceling them.
 *
 * A group counts its tasks from submit until their fn or cancel_fn returned (`pending`).
 * Counting is a lock-free atomic step per task except the last: the step from 1 to 0 is taken
 * under `mu`, together with the wakeups. That gives two guarantees:
 *   - no lost wakeup: an outside waiter checks `pending` and sleeps under `mu`, so the final
 *     decrement and its broadcast either happen before its check or after it sleeps;
 *   - no use after free: a thread that sees pending == 0 and closes the group must take `mu`
 *     first (tl_group_close does), so it waits until the last task's thread has left the group.
 *     Threads whose decrement leaves pending > 0 never touch the group again.
 * A waiter that is a worker of the pool it names does not sleep on `done`: it runs tasks of the
 * pool and, when there are none, parks with the pool's idle workers (pool.c's handshake). It
 * registers itself in `helpers` (under mu) so the final decrement also wakes that pool's parked
 * workers (lock order group->mu -> pool->park_mu; pool code never takes a group mutex).
 *
 * Cancellation is a flag read when a worker takes a task; tasks already running finish. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "scheduler/internal.h"

// ---------------------------------------------------------------------------------------------
// Counting
// ---------------------------------------------------------------------------------------------

int tl__group_add(tl_group_t* g) {
  if (atomic_load_explicit(&g->canceled, memory_order_relaxed)) return TL_ECANCELED;
  atomic_fetch_add(&g->pending, 1);
  return 0;
}

void tl__group_settle(tl_group_t* g) {
  int old = atomic_load(&g->pending);
  for (;;) {
    if (old == 1) {
      /* Possibly the last: decide under mu (a concurrent submit may have raised it). */
      pthread_mutex_lock(&g->mu);
      if (atomic_fetch_sub(&g->pending, 1) == 1) {
        pthread_cond_broadcast(&g->done);
        for (tl__helper_t* h = g->helpers; h; h = h->next) {
          pthread_mutex_lock(&h->pool->park_mu);
          pthread_cond_broadcast(&h->pool->park_cond);
          pthread_mutex_unlock(&h->pool->park_mu);
        }
      }
      pthread_mutex_unlock(&g->mu);
      return;
    }
    if (atomic_compare_exchange_weak(&g->pending, &old, old - 1)) return;
  }
}

// ---------------------------------------------------------------------------------------------
// Public calls
// ---------------------------------------------------------------------------------------------

int tl_group_init(tl_group_t** out) {
  tl__clear_detail();
  if (!out) return tl__fail(TL_EINVAL, "tl_group_init: NULL out");
  *out = NULL;
  tl_group_t* g = calloc(1, sizeof *g);
  if (!g) return tl__fail(TL_ENOMEM, "tl_group_init");
  int rc = pthread_mutex_init(&g->mu, NULL);
  if (rc) {
    free(g);
    return tl__fail(tl_translate_sys_error(rc), "tl_group_init: %s", strerror(rc));
  }
  if ((rc = tl__cond_init_monotonic(&g->done))) {
    pthread_mutex_destroy(&g->mu);
    free(g);
    return tl__fail(tl_translate_sys_error(rc), "tl_group_init: %s", strerror(rc));
  }
  atomic_init(&g->pending, 0);
  atomic_init(&g->canceled, false);
  *out = g;
  return 0;
}

/* Waiting as a worker of `pool`: run the pool's tasks until the group is done. */
static int tl__help_wait(tl_group_t* g, tl__worker_t* w, int64_t deadline) {
  tl__helper_t h = {w->pool, NULL};
  pthread_mutex_lock(&g->mu);
  h.next = g->helpers;
  g->helpers = &h;
  pthread_mutex_unlock(&g->mu);
  int rc = 0;
  tl__task_t t;
  while (atomic_load(&g->pending) > 0) {
    if (tl__find_task(w, &t)) {
      tl__run_task(w, &t);
      continue;
    }
    if (deadline && tl__now_ns() >= deadline) {
      rc = TL_ETIMEDOUT;
      break;
    }
    tl__park(w, g, deadline);
  }
  pthread_mutex_lock(&g->mu);
  for (tl__helper_t** pp = &g->helpers; *pp; pp = &(*pp)->next)
    if (*pp == &h) {
      *pp = h.next;
      break;
    }
  pthread_mutex_unlock(&g->mu);
  return rc;
}

int tl_group_wait(tl_group_t* group, tl_pool_t* pool, int64_t timeout_ms) {
  tl__clear_detail();
  if (!group) return tl__fail(TL_EINVAL, "tl_group_wait: NULL group");
  if (atomic_load(&group->pending) == 0) return 0;
  int64_t deadline = timeout_ms < 0 ? 0 : tl__now_ns() + timeout_ms * 1000000;
  tl__worker_t* w = tl__self_worker();
  int rc = 0;
  if (w && pool && w->pool == pool) {
    rc = tl__help_wait(group, w, deadline);
  } else {
    pthread_mutex_lock(&group->mu);
    while (atomic_load(&group->pending) > 0) {
      if (!deadline) {
        pthread_cond_wait(&group->done, &group->mu);
        continue;
      }
      struct timespec ts = tl__timespec_of_ns(deadline);
      if (pthread_cond_timedwait(&group->done, &group->mu, &ts) == ETIMEDOUT &&
          atomic_load(&group->pending) > 0) {
        rc = TL_ETIMEDOUT;
        break;
      }
    }
    pthread_mutex_unlock(&group->mu);
  }
  if (rc)
    return tl__fail(rc, "tl_group_wait: %d task(s) still pending after %lld ms",
                    atomic_load(&group->pending), (long long)timeout_ms);
  return 0;
}

int tl_group_cancel(tl_group_t* group) {
  tl__clear_detail();
  if (!group) return tl__fail(TL_EINVAL, "tl_group_cancel: NULL group");
  atomic_store(&group->canceled, true);
  return 0;
}

int tl_group_pending(const tl_group_t* group) {
  return group ? atomic_load(&((tl_group_t*)group)->pending) : -1;
}

int tl_group_close(tl_group_t* group) {
  tl__clear_detail();
  if (!group) return tl__fail(TL_EINVAL, "tl_group_close: NULL group");
  pthread_mutex_lock(&group->mu); /* waits out a last task still broadcasting */
  int pending = atomic_load(&group->pending);
  pthread_mutex_unlock(&group->mu);
  if (pending > 0)
    return tl__fail(TL_EBUSY, "tl_group_close: %d task(s) pending: wait for the group first", pending);
  pthread_cond_destroy(&group->done);
  pthread_mutex_destroy(&group->mu);
  free(group);
  return 0;
}
