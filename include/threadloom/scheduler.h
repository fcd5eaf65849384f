/* threadloom/scheduler.h: a pool of (optionally pinned) worker threads with work stealing.
 *
 * A tl_pool_t runs C tasks `fn(arg)` on its workers. Each worker owns a deque: tasks submitted
 * from a worker go to the bottom of its own deque (it takes them back last-in first-out, for
 * locality), idle workers steal from the top of the others' deques (first-in first-out, the
 * oldest and usually biggest pieces of work). Tasks submitted from other threads go through a
 * bounded injection queue, which gives external producers backpressure. Idle workers spin
 * briefly, then park on a condition variable; they use no CPU while parked.
 *
 * A tl_group_t counts tasks so a caller can wait for a set of them (tl_group_wait) or cancel
 * the ones not yet started (tl_group_cancel). Waiting from a worker of the pool runs other
 * tasks meanwhile, so recursive task trees that wait for their children cannot deadlock.
 *
 * The callback rule (docs/design.md): for every task a submit call accepted (returned 0),
 * exactly one of fn(arg) or cancel_fn(arg) is called once, on a worker thread of the pool;
 * when submit fails, neither is ever called. cancel_fn may be NULL (nothing is called then).
 *
 * Thread-safety: every function here is thread-safe on one object unless it says otherwise
 * (submit, wait, cancel and stats may be called from any thread at once, workers included).
 * Ownership: the caller owns pools and groups (init/close); `arg` stays the caller's. */
#ifndef THREADLOOM_SCHEDULER_H
#define THREADLOOM_SCHEDULER_H

#include "threadloom/common.h"
#include "threadloom/numa.h"

TL_BEGIN_DECLS

typedef struct tl_pool_s tl_pool_t;
typedef struct tl_group_s tl_group_t;
typedef void (*tl_task_fn)(void* arg);

typedef struct {
  int workers;              /* threads; 0 (default): one per slot of the plan's (role, gpu)
                               group, or without a plan one per CPU (PU) in this thread's
                               affinity mask */
  tl_plan_t* plan;          /* NULL (default): unpinned. Else each worker claims a slot
                               (tl_plan_claim(plan, role, gpu)) and pins itself (tl_pin_self)
                               before on_start; a refused pin is recorded in the stats, not
                               fatal. Borrowed: the plan must outlive tl_pool_init only */
  tl_role_t role;           /* which slots of the plan (default TL_ROLE_LOADER) */
  int gpu;                  /* ... for which GPU (default -1: none) */
  size_t inject_capacity;   /* tasks the injection queue holds (default 1024, at least 1) */
  void (*on_start)(void* ud, int worker); /* NULL or called on each worker thread, after
                               pinning and before its first task; tl_pool_init returns after
                               every worker's on_start has returned */
  void (*on_stop)(void* ud, int worker);  /* NULL or called on each worker thread after its
                               last task (during tl_pool_close) */
  void* ud;                 /* passed to on_start and on_stop */
  const char* name;         /* thread name prefix (pthread_setname_np, the kernel keeps 15
                               bytes: "<name>-<index>" is truncated), default "tl-worker";
                               copied */
} tl_pool_options_t;

typedef struct {
  uint64_t executed;        /* tasks whose fn ran (to completion) */
  uint64_t canceled;        /* tasks that got cancel_fn (or nothing, when it was NULL) */
  uint64_t stolen;          /* tasks taken from another worker's deque */
  uint64_t parked;          /* times a worker went to sleep for lack of work */
  uint64_t injected;        /* tasks accepted through the injection queue */
  int pinned_workers;       /* workers whose CPU affinity was set from the plan */
  char pin_refused[256];    /* the first refusal (pin or memory policy), "" if none */
} tl_pool_stats_t;

/* Sets the defaults documented in tl_pool_options_t. */
TL_EXTERN void tl_pool_options_default(tl_pool_options_t* opts);

/* Starts a pool (opts NULL: defaults) and returns once every worker has pinned itself and run
 * on_start. The caller owns *out and releases it with tl_pool_close(). Errors: TL_EINVAL (out
 * NULL, workers < 0, or the plan has no slot for (role, gpu); tl_err_detail() says which),
 * TL_ENOMEM, TL_EAGAIN (the system refused a thread); nothing is left running on failure. */
TL_EXTERN int tl_pool_init(tl_pool_t** out, const tl_pool_options_t* opts);

/* Submits fn(arg) (cancel_fn may be NULL) as a task of `group` (may be NULL). From a worker of
 * this pool the task goes to that worker's own deque: it never blocks and the deque grows.
 * From any other thread it goes to the injection queue, waiting while the queue is full
 * (backpressure; tl_pool_close wakes such a wait with TL_ECLOSED). Errors: TL_EINVAL (pool or
 * fn NULL), TL_ECLOSED (tl_pool_close has begun; the pool's own workers may still submit while
 * it drains, so task trees complete), TL_ECANCELED (group was canceled), TL_ENOMEM (a deque
 * could not grow). On error neither fn nor cancel_fn is ever called. */
TL_EXTERN int tl_pool_submit(tl_pool_t* pool, tl_group_t* group, tl_task_fn fn,
                             tl_task_fn cancel_fn, void* arg);
/* As tl_pool_submit but never waits: TL_EAGAIN when the injection queue is full. */
TL_EXTERN int tl_pool_try_submit(tl_pool_t* pool, tl_group_t* group, tl_task_fn fn,
                                 tl_task_fn cancel_fn, void* arg);

/* Makes submits from threads other than the pool's workers fail with TL_ECLOSED from now on,
 * and wakes those blocked on a full injection queue (they return TL_ECLOSED too); queued tasks
 * still run and the workers may still submit. For callers whose other threads may be
 * submitting when they decide to close: stop accepting, wait until those calls returned, then
 * tl_pool_close. Idempotent; thread-safe on one object. */
TL_EXTERN void tl_pool_stop_accepting(tl_pool_t* pool);

/* Stops accepting submits from other threads (they get TL_ECLOSED), runs (cancel_pending 0) or
 * cancels (1: cancel_fn instead of fn) every queued task, including tasks that running tasks
 * submit meanwhile, calls on_stop on each worker, joins every thread and frees the pool.
 * Tasks already running finish normally. Call it once, after the last external submit has
 * returned (the pool's memory is gone when it returns). Errors: TL_EINVAL (pool NULL), TL_EBUSY
 * (called from one of the pool's own workers: nothing happens). */
TL_EXTERN int tl_pool_close(tl_pool_t* pool, int cancel_pending);

/* The index (0 .. size-1) of the calling thread among this pool's workers, -1 if it is not one.
 * Never fails. */
TL_EXTERN int tl_pool_worker_index(const tl_pool_t* pool);
/* The number of workers; -1 for NULL. */
TL_EXTERN int tl_pool_size(const tl_pool_t* pool);
/* Fills *out with counters summed over the workers. May be called while tasks run; the
 * counters are each exact but read one after another, not as one snapshot. Errors: TL_EINVAL. */
TL_EXTERN int tl_pool_stats(const tl_pool_t* pool, tl_pool_stats_t* out);

/* Creates an empty group. Caller owns *out (tl_group_close). A group may take tasks of several
 * pools. Errors: TL_EINVAL, TL_ENOMEM. */
TL_EXTERN int tl_group_init(tl_group_t** out);
/* Waits until every task of the group has run or been canceled. timeout_ms -1: no timeout;
 * 0: just check. When the caller is a worker of `pool` (may be NULL), it runs queued tasks of
 * the pool (any group's) while it waits, so waiting from inside tasks cannot deadlock.
 * Errors: TL_EINVAL, TL_ETIMEDOUT (tasks are still pending). */
TL_EXTERN int tl_group_wait(tl_group_t* group, tl_pool_t* pool, int64_t timeout_ms);
/* Cancels the group: its tasks not yet started get cancel_fn instead of fn, and later submits
 * to it fail with TL_ECANCELED. Running tasks are not interrupted. Cannot be undone (make a new
 * group). Errors: TL_EINVAL. */
TL_EXTERN int tl_group_cancel(tl_group_t* group);
/* Tasks of the group not yet finished (queued or running); -1 for NULL. */
TL_EXTERN int tl_group_pending(const tl_group_t* group);
/* Frees the group. Errors: TL_EINVAL, TL_EBUSY (tasks are pending: nothing happens). Not
 * thread-safe with other calls on the same group. */
TL_EXTERN int tl_group_close(tl_group_t* group);

TL_END_DECLS

#endif /* THREADLOOM_SCHEDULER_H */
