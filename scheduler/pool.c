/* scheduler/pool.c: the worker pool: threads, submitting, finding work, parking and shutdown.
 *
 * Each worker loops: take a task (its own deque, then the injection queue, then steal from the
 * others, starting at a random victim), run it; when nothing is found, spin briefly watching
 * the queues' sizes, then park on park_cond. tl_group_wait from a worker runs the same loop
 * until its group is done (group.c), so a waiting task lends its thread to the pool.
 *
 * Parking without lost wakeups (a Dekker-style handshake on seq_cst atomics). Every queue has
 * an atomic `size`; a push or put stores it seq_cst (deque.c). Then:
 *   submitter:  push task, size = k > 0 (seq_cst store); if (sleepers > 0, seq_cst load)
 *               { lock park_mu; signal; unlock }
 *   parker:     lock park_mu; sleepers += 1 (seq_cst); load every queue's size (seq_cst);
 *               if one is > 0 give up, else cond_wait (releases park_mu atomically);
 *               sleepers -= 1; unlock
 * All these seq_cst operations fall in one total order. If the parker's load of that queue's
 * size comes before the submitter's store, then the parker's increment of `sleepers` (earlier
 * in its program order) comes before the submitter's load of `sleepers`, which therefore reads
 * > 0: the submitter signals, and as it must take park_mu to do so, the signal lands after the
 * parker is inside cond_wait (or before it took park_mu, when it would have seen the task).
 * Otherwise the parker reads the submitter's size or a later one: > 0, it does not sleep; 0,
 * someone already took the task. Either way no queued task waits while a worker sleeps.
 * Closing sets `closing` and broadcasts under park_mu, so a parker either sees it or is woken.
 *
 * Spinning: a worker spinning in tl__park is counted in `spinning` (seq_cst increment before
 * its polls, decrement after them), and a submitter wakes no one while spinning > 0: without
 * that, a stream of submits pays a mutex and a futex wake per task although a worker is about
 * to take it. No task is lost: if the submitter's seq_cst load of `spinning` read > 0, some
 * spinner's decrement comes after that load, hence after the size store, in the total order,
 * and that spinner's next seq_cst check of the sizes (polling, or in the park section, which
 * it cannot skip before sleeping) sees the task or a later state. Invariant: while a task is
 * queued and a worker sleeps, some worker is running or spinning and will find it; and
 * parallelism is kept by the finder, not the submitter: a worker that takes a task from the
 * injection queue or by stealing, and sees more queued, wakes a parked worker (find_task).
 * There is no global counter of queued tasks: the hot path (a worker pushing to and popping
 * from its own deque) writes only its own cache lines and reads the read-mostly `sleepers`.
 *
 * Batches: when its own deque is empty a worker takes up to TL__BATCH tasks at once, its share
 * (count / workers, rounded up) of the injection queue or half of a victim's deque, runs the
 * first and pushes the rest into its own deque, where thieves see them; so a task from the
 * injection queue may wait in a deque, and the memory bound is inject_capacity plus TL__BATCH
 * per worker beyond what tasks spawn themselves. Moving tasks never loses one to a parker: the
 * taker is running, not parked, and the push stores its deque's size seq_cst (then wakes a
 * parked worker to share them).
 *
 * Shutdown: tl_pool_close closes the injection queue (under its mutex: a put lands before or
 * is refused), sets `closing`, wakes everyone and joins. A worker leaves its loop only when
 * `closing` is set, it found no task, and every queue's size reads 0. Tasks that running tasks
 * submit meanwhile go to their own worker's deque, and that worker checks its deque again
 * after the task returns, so nothing is left behind; with cancel_pending every task taken
 * after close began is canceled instead of run, and the closing thread itself cancels what
 * waits in the injection queue and in every deque at once.
 *
 * Atomics: the queues' sizes and sleepers (the handshake, seq_cst); closing, cancel_all (flags
 * read per loop / per task by all workers); per-worker counters (written by the owner, read by
 * stats). Everything else is fixed after init or guarded by the mutex named in its comment. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "scheduler/internal.h"

#define TL__DEFAULT_INJECT 1024
#define TL__SPIN 128 /* polls of the queues' sizes before parking */
#define TL__BATCH 32 /* most tasks one steal or one take from the injection queue moves */

static _Thread_local tl__worker_t* tl__self;

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

tl__worker_t* tl__self_worker(void) { return tl__self; }

static inline void tl__cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* Owner-only counter bump: a load and a store, no locked read-modify-write. */
static inline void tl__bump(_Atomic uint64_t* c) {
  atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1, memory_order_relaxed);
}

static uint64_t tl__xorshift(uint64_t* s) {
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

// ---------------------------------------------------------------------------------------------
// Finding, running, parking
// ---------------------------------------------------------------------------------------------

static void tl__wake_one(tl_pool_t* p);
static bool tl__has_work(tl_pool_t* p);

/* find_task's slow path, out of line: the hot path (a pop from the own deque) keeps a small
 * frame without the batch buffer. */
static __attribute__((noinline)) bool tl__find_elsewhere(tl__worker_t* w, tl__task_t* out) {
  tl_pool_t* p = w->pool;
  /* From here on tasks are taken in batches: the first is run, the rest go to w's own deque
   * (room reserved first, so the move cannot fail; without room only one task is taken). */
  tl__task_t buf[TL__BATCH];
  size_t k = 0, max = tl__deque_reserve(&w->deque, TL__BATCH - 1) == 0 ? TL__BATCH : 1;
  k = tl__inject_take_batch(&p->inject, buf, max, (size_t)p->nworkers);
  int n = p->nworkers;
  if (!k && n > 1) {
    int start = (int)(tl__xorshift(&w->rng) % (uint64_t)n);
    for (int i = 0; i < n && !k; i++) {
      int v = start + i < n ? start + i : start + i - n;
      if (v == w->index) continue;
      k = tl__deque_steal_batch(&p->workers[v].deque, buf, max);
      if (k) atomic_store_explicit(&w->stolen, atomic_load_explicit(&w->stolen, memory_order_relaxed) + k,
                                   memory_order_relaxed);
    }
  }
  if (!k) return false;
  *out = buf[0];
  if (k > 1) tl__deque_push_rev(&w->deque, buf + 1, k - 1);
  /* Submitters do not wake anyone while a worker spins (tl__wake_one): so a worker that found
   * work this way, leaving more queued (in its deque or elsewhere), wakes a parked one to share
   * it. Checked only when someone sleeps. */
  if (atomic_load(&p->sleepers) > 0 && (k > 1 || tl__has_work(p))) tl__wake_one(p);
  return true;
}

bool tl__find_task(tl__worker_t* w, tl__task_t* out) {
  return tl__deque_pop(&w->deque, out) || tl__find_elsewhere(w, out);
}

/* Whether some queue of p holds a task (seq_cst loads: the parker's half of the handshake). */
static bool tl__has_work(tl_pool_t* p) {
  if (atomic_load(&p->inject.size) > 0) return true;
  for (int i = 0; i < p->nworkers; i++)
    if (atomic_load(&p->workers[i].deque.size) > 0) return true;
  return false;
}

void tl__run_task(tl__worker_t* w, tl__task_t* t) {
  tl_group_t* g = t->group;
  bool cancel = atomic_load_explicit(&w->pool->cancel_all, memory_order_relaxed) ||
                (g && atomic_load_explicit(&g->canceled, memory_order_relaxed));
  if (cancel) {
    if (t->cancel) t->cancel(t->arg);
    tl__bump(&w->canceled);
  } else {
    t->fn(t->arg);
    tl__bump(&w->executed);
  }
  if (g) tl__group_settle(g);
}

/* True when a worker parked in tl__park should stay asleep. Called under park_mu. */
static bool tl__should_sleep(tl_pool_t* p, tl_group_t* g) {
  if (tl__has_work(p)) return false;
  if (g) return atomic_load(&g->pending) > 0; /* a helper sleeps through closing */
  return !atomic_load(&p->closing);
}

void tl__park(tl__worker_t* w, tl_group_t* g, int64_t deadline_ns) {
  tl_pool_t* p = w->pool;
  atomic_fetch_add(&p->spinning, 1); /* seq_cst: see "Spinning" at the top */
  for (int i = 0; i < TL__SPIN; i++) {
    if (tl__has_work(p)) {
      atomic_fetch_sub(&p->spinning, 1);
      return;
    }
    tl__cpu_relax();
  }
  atomic_fetch_sub(&p->spinning, 1); /* seq_cst, before the park section's checks */
  pthread_mutex_lock(&p->park_mu);
  atomic_fetch_add(&p->sleepers, 1); /* seq_cst: see the handshake at the top */
  if (tl__should_sleep(p, g)) {
    tl__bump(&w->parked);
    if (deadline_ns) {
      struct timespec ts = tl__timespec_of_ns(deadline_ns);
      pthread_cond_timedwait(&p->park_cond, &p->park_mu, &ts);
    } else {
      pthread_cond_wait(&p->park_cond, &p->park_mu);
    }
  }
  atomic_fetch_sub(&p->sleepers, 1);
  pthread_mutex_unlock(&p->park_mu);
}

/* The submitter's half of the handshake, after the task is queued. */
static void tl__wake_one(tl_pool_t* p) {
  /* seq_cst loads, after the queue's seq_cst size store; a spinning worker will see the task */
  if (atomic_load(&p->sleepers) > 0 && atomic_load(&p->spinning) == 0) {
    pthread_mutex_lock(&p->park_mu);
    pthread_cond_signal(&p->park_cond);
    pthread_mutex_unlock(&p->park_mu);
  }
}

// ---------------------------------------------------------------------------------------------
// Worker threads
// ---------------------------------------------------------------------------------------------

static void tl__pin_worker(tl__worker_t* w) {
  tl_pool_t* p = w->pool;
  int id = -1, wrapped = 0;
  tl_pin_result_t res;
  memset(&res, 0, sizeof res);
  int rc = tl_plan_claim(p->plan, p->role, p->gpu, &id, &wrapped);
  if (rc == 0) rc = tl_pin_self(p->plan, id, &res);
  pthread_mutex_lock(&p->start_mu);
  if (rc == 0) {
    p->pinned++;
    if (res.refused[0] && !p->pin_refused[0])
      snprintf(p->pin_refused, sizeof p->pin_refused, "worker %d (slot %d): %.200s", w->index, id, res.refused);
  } else if (!p->pin_refused[0]) {
    snprintf(p->pin_refused, sizeof p->pin_refused, "worker %d (slot %d): %s: %s", w->index, id,
             tl_err_name(rc), tl_err_detail());
  }
  pthread_mutex_unlock(&p->start_mu);
}

static void* tl__worker_main(void* arg) {
  tl__worker_t* w = arg;
  tl_pool_t* p = w->pool;
  tl__self = w;
  char name[32];
  snprintf(name, sizeof name, "%s-%d", p->name, w->index);
  name[15] = '\0'; /* the kernel's limit, 16 bytes with the terminator */
  pthread_setname_np(pthread_self(), name);
  if (p->plan) tl__pin_worker(w);
  if (p->on_start) p->on_start(p->ud, w->index);
  pthread_mutex_lock(&p->start_mu);
  p->started++;
  pthread_cond_broadcast(&p->start_cond);
  pthread_mutex_unlock(&p->start_mu);

  tl__task_t t;
  for (;;) {
    if (tl__find_task(w, &t)) {
      tl__run_task(w, &t);
      continue;
    }
    if (atomic_load(&p->closing) && !tl__has_work(p)) break;
    tl__park(w, NULL, 0);
  }
  if (p->on_stop) p->on_stop(p->ud, w->index);
  tl__self = NULL;
  return NULL;
}

// ---------------------------------------------------------------------------------------------
// Init and close
// ---------------------------------------------------------------------------------------------

void tl_pool_options_default(tl_pool_options_t* opts) {
  if (!opts) return;
  memset(opts, 0, sizeof *opts);
  opts->role = TL_ROLE_LOADER;
  opts->gpu = -1;
  opts->inject_capacity = TL__DEFAULT_INJECT;
  opts->name = "tl-worker";
}

/* Slots of (role, gpu) in the plan; 0 with the plan's error detail when there are none. */
static int tl__plan_group_size(tl_plan_t* plan, tl_role_t role, int gpu, int* n) {
  int id;
  int rc = tl_plan_find(plan, role, gpu, 0, &id);
  if (rc) return rc;
  *n = 0;
  for (int i = 0; i < tl_plan_size(plan); i++) {
    tl_plan_slot_t s;
    if (tl_plan_slot(plan, i, &s) == 0 && s.role == role && s.gpu == gpu) (*n)++;
  }
  return 0;
}

/* Stops and joins the first `created` workers, then frees everything. */
static void tl__pool_free(tl_pool_t* p, int created) {
  tl__inject_close(&p->inject);
  atomic_store(&p->closing, true);
  pthread_mutex_lock(&p->park_mu);
  pthread_cond_broadcast(&p->park_cond);
  pthread_mutex_unlock(&p->park_mu);
  for (int i = 0; i < created; i++) pthread_join(p->workers[i].thread, NULL);
  for (int i = 0; i < p->nworkers; i++) tl__deque_destroy(&p->workers[i].deque);
  free(p->workers);
  tl__inject_destroy(&p->inject);
  pthread_cond_destroy(&p->start_cond);
  pthread_mutex_destroy(&p->start_mu);
  pthread_cond_destroy(&p->park_cond);
  pthread_mutex_destroy(&p->park_mu);
  free(p);
}

int tl_pool_init(tl_pool_t** out, const tl_pool_options_t* opts) {
  tl__clear_detail();
  if (!out) return tl__fail(TL_EINVAL, "tl_pool_init: NULL out");
  *out = NULL;
  tl_pool_options_t o;
  if (opts) o = *opts;
  else tl_pool_options_default(&o);
  if (o.workers < 0) return tl__fail(TL_EINVAL, "tl_pool_init: workers = %d", o.workers);
  if (o.inject_capacity == 0) o.inject_capacity = TL__DEFAULT_INJECT;
  int n = o.workers;
  if (o.plan) {
    int slots = 0;
    int rc = tl__plan_group_size(o.plan, o.role, o.gpu, &slots);
    if (rc) return rc; /* detail from tl_plan_find */
    if (n == 0) n = slots;
  } else if (n == 0) {
    cpu_set_t set;
    n = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
    if (n < 1) n = 1;
  }

  /* Cache-line aligned fields inside: sizeof is a multiple of the line, as aligned_alloc needs. */
  tl_pool_t* p = aligned_alloc(_Alignof(tl_pool_t), sizeof *p);
  if (!p) return tl__fail(TL_ENOMEM, "tl_pool_init");
  memset(p, 0, sizeof *p);
  p->nworkers = n;
  p->plan = o.plan;
  p->role = o.role;
  p->gpu = o.gpu;
  p->on_start = o.on_start;
  p->on_stop = o.on_stop;
  p->ud = o.ud;
  tl__strlcpy(p->name, o.name ? o.name : "tl-worker", sizeof p->name);
  atomic_init(&p->sleepers, 0);
  atomic_init(&p->spinning, 0);
  atomic_init(&p->closing, false);
  atomic_init(&p->cancel_all, false);
  atomic_init(&p->close_canceled, 0);

  /* Staged setup: `stage` counts the parts made, so a failure undoes exactly those. */
  int stage = 0, rc = pthread_mutex_init(&p->park_mu, NULL);
  if (!rc && ++stage && !(rc = tl__cond_init_monotonic(&p->park_cond)) && ++stage &&
      !(rc = pthread_mutex_init(&p->start_mu, NULL)) && ++stage &&
      !(rc = pthread_cond_init(&p->start_cond, NULL)) && ++stage) {
    rc = tl__inject_init(&p->inject, o.inject_capacity); /* a TL_E* code or 0 */
    if (rc) rc = rc == TL_ENOMEM ? ENOMEM : EINVAL;
    else stage++;
  }
  size_t bytes = (size_t)n * sizeof(tl__worker_t);
  if (!rc && !(p->workers = aligned_alloc(TL__CACHE_LINE, bytes))) rc = ENOMEM;
  int ndeques = 0;
  if (!rc) {
    memset(p->workers, 0, bytes);
    for (; ndeques < n; ndeques++) {
      tl__worker_t* w = &p->workers[ndeques];
      w->pool = p;
      w->index = ndeques;
      w->rng = 0x9E3779B97F4A7C15ull * (uint64_t)(ndeques + 1);
      if (tl__deque_init(&w->deque, 64)) {
        rc = ENOMEM;
        break;
      }
    }
  }
  if (rc) {
    for (int j = 0; j < ndeques; j++) tl__deque_destroy(&p->workers[j].deque);
    free(p->workers);
    if (stage > 4) tl__inject_destroy(&p->inject);
    if (stage > 3) pthread_cond_destroy(&p->start_cond);
    if (stage > 2) pthread_mutex_destroy(&p->start_mu);
    if (stage > 1) pthread_cond_destroy(&p->park_cond);
    if (stage > 0) pthread_mutex_destroy(&p->park_mu);
    free(p);
    return tl__fail(tl_translate_sys_error(rc), "tl_pool_init: %s", strerror(rc));
  }

  for (int i = 0; i < n; i++) {
    rc = pthread_create(&p->workers[i].thread, NULL, tl__worker_main, &p->workers[i]);
    if (rc) {
      tl__pool_free(p, i);
      return tl__fail(tl_translate_sys_error(rc), "tl_pool_init: could not start worker %d of %d: %s",
                      i, n, strerror(rc));
    }
  }
  pthread_mutex_lock(&p->start_mu);
  while (p->started < n) pthread_cond_wait(&p->start_cond, &p->start_mu);
  p->plan = NULL; /* borrowed until every worker has pinned itself */
  pthread_mutex_unlock(&p->start_mu);
  *out = p;
  return 0;
}

void tl_pool_stop_accepting(tl_pool_t* pool) {
  if (pool) tl__inject_close(&pool->inject);
}

int tl_pool_close(tl_pool_t* pool, int cancel_pending) {
  tl__clear_detail();
  if (!pool) return tl__fail(TL_EINVAL, "tl_pool_close: NULL pool");
  tl__worker_t* self = tl__self;
  if (self && self->pool == pool)
    return tl__fail(TL_EBUSY, "tl_pool_close called from worker %d of the same pool: close it "
                              "from a thread outside the pool", self->index);
  if (cancel_pending) {
    atomic_store(&pool->cancel_all, true);
    /* Cancel what waits in the injection queue here and now, on the closing thread: every
     * worker may be busy with a long task, and close(cancel) promises queued work is canceled,
     * not kept until a worker frees up. Tasks already in the workers' deques are canceled by
     * their workers (cancel_all). */
    tl__inject_close(&pool->inject);
    tl__task_t t;
    while (tl__inject_take(&pool->inject, &t)) {
      if (t.cancel) t.cancel(t.arg);
      atomic_fetch_add_explicit(&pool->close_canceled, 1, memory_order_relaxed);
      if (t.group) tl__group_settle(t.group);
    }
    /* Workers move batches of injected tasks into their deques (find_task): a busy worker's
     * deque may hold tasks that came through the injection queue, so they are stolen and
     * canceled here too. Tasks pushed later by running tasks are canceled by their workers. */
    for (int i = 0; i < pool->nworkers; i++)
      while (tl__deque_steal(&pool->workers[i].deque, &t)) {
        if (t.cancel) t.cancel(t.arg);
        atomic_fetch_add_explicit(&pool->close_canceled, 1, memory_order_relaxed);
        if (t.group) tl__group_settle(t.group);
      }
  }
  tl__pool_free(pool, pool->nworkers);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Submitting
// ---------------------------------------------------------------------------------------------

static int tl__submit(tl_pool_t* p, tl_group_t* g, tl_task_fn fn, tl_task_fn cancel_fn, void* arg,
                      bool wait) {
  if (!p || !fn) return tl__fail(TL_EINVAL, "tl_pool_submit: NULL %s", p ? "fn" : "pool");
  tl__task_t t = {fn, cancel_fn, arg, g};
  if (g) {
    int rc = tl__group_add(g);
    if (rc) return tl__fail(rc, "tl_pool_submit: the group was canceled");
  }
  tl__worker_t* w = tl__self;
  int rc;
  if (w && w->pool == p) {
    rc = tl__deque_push(&w->deque, &t);
    if (rc) rc = tl__fail(rc, "tl_pool_submit: worker %d's deque cannot grow", w->index);
  } else {
    if (atomic_load_explicit(&p->closing, memory_order_relaxed)) rc = TL_ECLOSED;
    else rc = tl__inject_put(&p->inject, &t, wait);
    if (rc == TL_ECLOSED) rc = tl__fail(rc, "tl_pool_submit: the pool is closing");
    else if (rc == TL_EAGAIN) rc = tl__fail(rc, "tl_pool_submit: the injection queue is full");
  }
  if (rc) {
    if (g) tl__group_settle(g); /* roll back: no callback will come for this task */
    return rc;
  }
  tl__wake_one(p);
  return 0;
}

int tl_pool_submit(tl_pool_t* pool, tl_group_t* group, tl_task_fn fn, tl_task_fn cancel_fn, void* arg) {
  return tl__submit(pool, group, fn, cancel_fn, arg, true);
}

int tl_pool_try_submit(tl_pool_t* pool, tl_group_t* group, tl_task_fn fn, tl_task_fn cancel_fn,
                       void* arg) {
  return tl__submit(pool, group, fn, cancel_fn, arg, false);
}

// ---------------------------------------------------------------------------------------------
// Introspection
// ---------------------------------------------------------------------------------------------

int tl_pool_worker_index(const tl_pool_t* pool) {
  tl__worker_t* w = tl__self;
  return w && pool && w->pool == pool ? w->index : -1;
}

int tl_pool_size(const tl_pool_t* pool) { return pool ? pool->nworkers : -1; }

int tl_pool_stats(const tl_pool_t* pool, tl_pool_stats_t* out) {
  tl__clear_detail();
  if (!pool || !out) return tl__fail(TL_EINVAL, "tl_pool_stats: NULL argument");
  memset(out, 0, sizeof *out);
  for (int i = 0; i < pool->nworkers; i++) {
    const tl__worker_t* w = &pool->workers[i];
    out->executed += atomic_load_explicit(&w->executed, memory_order_relaxed);
    out->canceled += atomic_load_explicit(&w->canceled, memory_order_relaxed);
    out->stolen += atomic_load_explicit(&w->stolen, memory_order_relaxed);
    out->parked += atomic_load_explicit(&w->parked, memory_order_relaxed);
  }
  out->canceled += atomic_load_explicit(&pool->close_canceled, memory_order_relaxed);
  out->injected = atomic_load_explicit(&pool->inject.accepted, memory_order_relaxed);
  tl_pool_t* mp = (tl_pool_t*)pool; /* the mutex is not part of the logical state */
  pthread_mutex_lock(&mp->start_mu);
  out->pinned_workers = mp->pinned;
  tl__strlcpy(out->pin_refused, mp->pin_refused, sizeof out->pin_refused);
  pthread_mutex_unlock(&mp->start_mu);
  return 0;
}
