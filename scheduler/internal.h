/* scheduler/internal.h: the scheduler part's private state, shared by deque.c, pool.c and
 * group.c. Lock order (never take an earlier one while holding a later one):
 *   group->mu  ->  pool->park_mu
 * A deque's mutex and the injection queue's mutex are leaves: nothing else is taken while one
 * is held, and no two of them are ever held at once. */
#ifndef THREADLOOM_SCHEDULER_INTERNAL_H
#define THREADLOOM_SCHEDULER_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#include "core/internal.h"
#include "threadloom/scheduler.h"

#define TL__CACHE_LINE 64

// ---------------------------------------------------------------------------------------------
// Tasks and queues (deque.c)
// ---------------------------------------------------------------------------------------------

/* A task, stored by value in the queues: submitting allocates nothing. */
typedef struct {
  tl_task_fn fn;       /* called to run it */
  tl_task_fn cancel;   /* called instead when it is canceled; may be NULL */
  void* arg;           /* the caller's argument to either */
  tl_group_t* group;   /* counted in this group, or NULL */
} tl__task_t;

/* One worker's deque: a growable ring under a mutex. The owner pushes and pops at the bottom
 * (LIFO), thieves take from the top (FIFO). top and bottom grow without wrapping; the slot of
 * index i is buf[i & mask]. */
typedef struct {
  pthread_mutex_t mu;        /* guards buf, mask, top, bottom */
  tl__task_t* buf;           /* owned; mask + 1 slots */
  size_t mask;               /* capacity - 1 (capacity a power of two) */
  size_t top;                /* next slot a thief takes */
  size_t bottom;             /* next slot the owner fills */
  _Atomic size_t size;       /* bottom - top, stored under mu (seq_cst by push), read without
                                it so thieves skip empty deques and parkers see work (pool.c) */
} tl__deque_t;

int tl__deque_init(tl__deque_t* d, size_t capacity);
void tl__deque_destroy(tl__deque_t* d);
/* Owner only. TL_ENOMEM when the ring cannot grow. */
int tl__deque_push(tl__deque_t* d, const tl__task_t* t);
/* Owner: newest task. Returns false when empty. */
bool tl__deque_pop(tl__deque_t* d, tl__task_t* out);
/* Thief: oldest task. Returns false when empty. */
bool tl__deque_steal(tl__deque_t* d, tl__task_t* out);
/* Owner only: grows the ring until n more tasks fit. 0 or TL_ENOMEM. */
int tl__deque_reserve(tl__deque_t* d, size_t n);
/* Owner only, after tl__deque_reserve(d, n): pushes t[n-1] .. t[0], so t[0] is popped first. */
void tl__deque_push_rev(tl__deque_t* d, const tl__task_t* t, size_t n);
/* Thief: up to max of the oldest tasks, never more than half (rounded up) of those held, in
 * one lock, oldest first into out. Returns how many. */
size_t tl__deque_steal_batch(tl__deque_t* d, tl__task_t* out, size_t max);

/* The bounded multi-producer multi-consumer injection queue. */
typedef struct {
  pthread_mutex_t mu;        /* guards everything below except `size` reads */
  pthread_cond_t not_full;   /* signalled when a slot frees or the pool closes */
  tl__task_t* buf;           /* owned; cap slots */
  size_t cap;                /* capacity */
  size_t head;               /* index of the oldest task */
  size_t count;              /* tasks held */
  int blocked;               /* submitters waiting in not_full */
  bool closed;               /* set by close under mu: no more puts */
  _Atomic uint64_t accepted; /* puts that landed: stored under mu (no read-modify-write on the
                                submit path), read by tl_pool_stats without it */
  /* Polled by spinning workers on every pass: a line of its own, so their reads do not pull
   * the line the submitter locks and fills. */
  _Alignas(TL__CACHE_LINE) _Atomic size_t size; /* count, stored under mu (seq_cst by put),
                                                   read without it */
} tl__inject_t;

int tl__inject_init(tl__inject_t* q, size_t cap);
void tl__inject_destroy(tl__inject_t* q);
/* wait: block while full. 0, TL_EAGAIN (full, !wait) or TL_ECLOSED. */
int tl__inject_put(tl__inject_t* q, const tl__task_t* t, bool wait);
bool tl__inject_take(tl__inject_t* q, tl__task_t* out);
/* Up to max tasks, oldest first, and never more than ceil(count / share): one of `share` takers
 * leaves the rest to the others. Returns how many. */
size_t tl__inject_take_batch(tl__inject_t* q, tl__task_t* out, size_t max, size_t share);
/* Refuses later puts and wakes blocked ones (they return TL_ECLOSED). Returns false when it
 * was already closed. */
bool tl__inject_close(tl__inject_t* q);

// ---------------------------------------------------------------------------------------------
// Pool and groups
// ---------------------------------------------------------------------------------------------

/* One worker. Aligned to a cache line so the counters of neighbours never share one. */
typedef struct {
  _Alignas(TL__CACHE_LINE) tl_pool_t* pool; /* its pool */
  int index;                      /* 0 .. nworkers-1 */
  pthread_t thread;               /* its thread (valid once started) */
  uint64_t rng;                   /* xorshift state for picking victims; owner only */
  tl__deque_t deque;              /* its own tasks */
  /* Counters written by the owner only (load + store, no read-modify-write) and read by
   * tl_pool_stats from other threads, hence atomic (relaxed). */
  _Atomic uint64_t executed;      /* fn called */
  _Atomic uint64_t canceled;      /* cancel path taken */
  _Atomic uint64_t stolen;        /* tasks it stole */
  _Atomic uint64_t parked;        /* times it slept */
} tl__worker_t;

/* A waiter of a group that is a pool worker: the last task of the group wakes that pool's
 * parked workers so the helper sees the group is done. Lives on the waiter's stack, linked
 * under group->mu. */
typedef struct tl__helper_s {
  tl_pool_t* pool;                /* the helper's pool */
  struct tl__helper_s* next;      /* next helper of the same group */
} tl__helper_t;

struct tl_group_s {
  _Atomic int pending;            /* tasks accepted and not yet finished or canceled; the step
                                     from 1 to 0 happens under mu (see group.c) */
  _Atomic bool canceled;          /* tl_group_cancel was called; read by workers per task */
  pthread_mutex_t mu;             /* guards helpers and the 1 -> 0 step of pending */
  pthread_cond_t done;            /* broadcast when pending reaches 0 (CLOCK_MONOTONIC) */
  tl__helper_t* helpers;          /* pool workers waiting in tl_group_wait */
};

struct tl_pool_s {
  /* Read by every worker all the time, written rarely: one line of its own. */
  int nworkers;                   /* workers (fixed at init) */
  tl__worker_t* workers;          /* owned array */
  _Atomic bool closing;           /* tl_pool_close began: workers exit once no queue holds a task */
  _Atomic bool cancel_all;        /* close(cancel_pending=1): every task taken is canceled */
  /* The parking handshake (pool.c): the queues' seq_cst `size` stores and `sleepers` make a
   * submitter and a parking worker always see at least one of each other's writes. Read by
   * every submit, written only around parking. */
  _Alignas(TL__CACHE_LINE) _Atomic int sleepers; /* workers inside the park section */
  _Atomic int spinning;           /* workers polling in tl__park before the park section: a
                                     submitter wakes no one while > 0 (pool.c, "Spinning");
                                     read with sleepers by every submit, written when idle */
  _Alignas(TL__CACHE_LINE) tl__inject_t inject;  /* tasks from non-worker threads */
  pthread_mutex_t park_mu;        /* guards the park condition's sleep */
  pthread_cond_t park_cond;       /* where idle workers sleep (CLOCK_MONOTONIC) */
  _Atomic uint64_t close_canceled; /* injected tasks canceled by the closing thread itself */
  pthread_mutex_t start_mu;       /* guards started, stats_pinned, pin_refused */
  pthread_cond_t start_cond;      /* signalled as workers finish on_start */
  int started;                    /* workers that finished on_start (or failed to start) */
  int pinned;                     /* workers pinned from the plan */
  char pin_refused[256];          /* the first refusal */
  tl_plan_t* plan;                /* borrowed during init only (workers pin before init ends) */
  tl_role_t role;                 /* slots claimed from the plan */
  int gpu;                        /* ... for this GPU */
  void (*on_start)(void*, int);   /* user hook, may be NULL */
  void (*on_stop)(void*, int);    /* user hook, may be NULL */
  void* ud;                       /* their argument */
  char name[16];                  /* thread name prefix, truncated */
};

/* The worker the calling thread is, in any pool, or NULL. */
tl__worker_t* tl__self_worker(void);
/* Finds a task for w: own deque, then the injection queue, then stealing. */
bool tl__find_task(tl__worker_t* w, tl__task_t* out);
/* Runs (or cancels) a task taken from the pool and settles its group. */
void tl__run_task(tl__worker_t* w, tl__task_t* t);
/* Parks w until a queue of the pool holds a task, the pool is closing, or (group non-NULL)
 * the group has no pending tasks; deadline_ns 0: no deadline (CLOCK_MONOTONIC). Spins briefly first. */
void tl__park(tl__worker_t* w, tl_group_t* group, int64_t deadline_ns);
/* A task of g finished or was canceled (or a submit is rolled back). */
void tl__group_settle(tl_group_t* g);
/* Counts one more task in g; TL_ECANCELED if g is canceled. */
int tl__group_add(tl_group_t* g);

#endif /* THREADLOOM_SCHEDULER_INTERNAL_H */
