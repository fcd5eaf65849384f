/* tests/c/test-scheduler.c: the worker pool and task groups. Concurrency is arranged with
 * semaphores and barriers (a "gate" holds workers inside a task), never with sleeps. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "task.h"
#include "threadloom/threadloom.h"

#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#else
#define SANITIZED 0
#endif

static tl_pool_t* make_pool(int workers, size_t inject) {
  tl_pool_options_t o;
  tl_pool_options_default(&o);
  o.workers = workers;
  if (inject) o.inject_capacity = inject;
  tl_pool_t* p = NULL;
  ASSERT_OK(tl_pool_init(&p, &o));
  ASSERT_EQ(tl_pool_size(p), workers);
  return p;
}

// ---------------------------------------------------------------------------------------------
// Helpers: counting tasks, and a gate that holds workers inside a task
// ---------------------------------------------------------------------------------------------

typedef struct {
  _Atomic int ran;      /* fn calls */
  _Atomic int canceled; /* cancel_fn calls */
} slot_t;

static void slot_run(void* arg) { atomic_fetch_add(&((slot_t*)arg)->ran, 1); }
static void slot_cancel(void* arg) { atomic_fetch_add(&((slot_t*)arg)->canceled, 1); }

typedef struct {
  sem_t entered; /* posted by each task that reached the gate */
  sem_t open;    /* posted once per task to let it through */
} gate_t;

static void gate_init(gate_t* g) {
  ASSERT_EQ(sem_init(&g->entered, 0, 0), 0);
  ASSERT_EQ(sem_init(&g->open, 0, 0), 0);
}
static void gate_destroy(gate_t* g) {
  sem_destroy(&g->entered);
  sem_destroy(&g->open);
}
static void gate_task(void* arg) {
  gate_t* g = arg;
  sem_post(&g->entered);
  while (sem_wait(&g->open) != 0 && errno == EINTR) {
  }
}
static void sem_wait_n(sem_t* s, int n) {
  for (int i = 0; i < n; i++)
    while (sem_wait(s) != 0) ASSERT_EQ(errno, EINTR);
}
static void sem_post_n(sem_t* s, int n) {
  for (int i = 0; i < n; i++) sem_post(s);
}
/* Blocks every worker of p inside a gate task; returns when all are inside. */
static void hold_workers(tl_pool_t* p, gate_t* g) {
  int n = tl_pool_size(p);
  for (int i = 0; i < n; i++) ASSERT_OK(tl_pool_submit(p, NULL, gate_task, NULL, g));
  sem_wait_n(&g->entered, n);
}

// ---------------------------------------------------------------------------------------------
// Basics
// ---------------------------------------------------------------------------------------------

TEST_IMPL(sched_every_task_once) {
  enum { N = 20000 };
  slot_t* s = calloc(N, sizeof *s);
  tl_pool_t* p = make_pool(4, 64); /* a small queue: the submitter meets backpressure too */
  tl_group_t* g;
  ASSERT_OK(tl_group_init(&g));
  for (int i = 0; i < N; i++) ASSERT_OK(tl_pool_submit(p, g, slot_run, slot_cancel, &s[i]));
  ASSERT_OK(tl_group_wait(g, p, -1));
  ASSERT_EQ(tl_group_pending(g), 0);
  for (int i = 0; i < N; i++) {
    ASSERT_EQ(s[i].ran, 1);
    ASSERT_EQ(s[i].canceled, 0);
  }
  tl_pool_stats_t st;
  ASSERT_OK(tl_pool_stats(p, &st));
  ASSERT_EQ(st.executed, N);
  ASSERT_EQ(st.injected, N);
  ASSERT_EQ(st.canceled, 0);
  ASSERT_EQ(st.pinned_workers, 0);
  ASSERT_OK(tl_group_close(g));
  ASSERT_OK(tl_pool_close(p, 0));
  free(s);
  return 0;
}

TEST_IMPL(sched_argument_errors) {
  tl_pool_t* p = NULL;
  tl_pool_options_t o;
  tl_pool_options_default(&o);
  ASSERT_EQ(o.inject_capacity, 1024);
  ASSERT_STR_EQ(o.name, "tl-worker");
  o.workers = -1;
  ASSERT_EQ(tl_pool_init(&p, &o), TL_EINVAL);
  ASSERT(p == NULL);
  ASSERT_EQ(tl_pool_init(NULL, NULL), TL_EINVAL);
  ASSERT_OK(tl_pool_init(&p, NULL)); /* one worker per allowed CPU */
  cpu_set_t set;
  ASSERT_EQ(sched_getaffinity(0, sizeof set, &set), 0);
  ASSERT_EQ(tl_pool_size(p), CPU_COUNT(&set));
  ASSERT_EQ(tl_pool_submit(p, NULL, NULL, NULL, NULL), TL_EINVAL);
  ASSERT_EQ(tl_pool_submit(NULL, NULL, slot_run, NULL, NULL), TL_EINVAL);
  ASSERT_EQ(tl_pool_stats(p, NULL), TL_EINVAL);
  ASSERT_EQ(tl_pool_worker_index(p), -1);
  ASSERT_EQ(tl_pool_size(NULL), -1);
  ASSERT_EQ(tl_group_init(NULL), TL_EINVAL);
  ASSERT_EQ(tl_group_wait(NULL, p, 0), TL_EINVAL);
  ASSERT_EQ(tl_group_pending(NULL), -1);
  ASSERT_EQ(tl_group_close(NULL), TL_EINVAL);
  ASSERT_EQ(tl_pool_close(NULL, 0), TL_EINVAL);
  ASSERT_OK(tl_pool_close(p, 0));
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Hooks, worker identity, closing from a worker
// ---------------------------------------------------------------------------------------------

enum { HOOK_WORKERS = 3 };
typedef struct {
  _Atomic int starts[HOOK_WORKERS];   /* on_start calls per worker */
  _Atomic int stops[HOOK_WORKERS];    /* on_stop calls per worker */
  pthread_t start_thread[HOOK_WORKERS];
  pthread_t stop_thread[HOOK_WORKERS];
  char names[HOOK_WORKERS][16];
  _Atomic int tasks_seen_started;     /* tasks that ran on a worker whose on_start had run */
  tl_pool_t* _Atomic pool;
  _Atomic int close_rc;               /* tl_pool_close from a worker */
  _Atomic int index_ok;               /* worker index inside a task matched its thread */
  pthread_barrier_t barrier;
} hooks_t;

static void on_start(void* ud, int w) {
  hooks_t* h = ud;
  ASSERT(w >= 0 && w < HOOK_WORKERS);
  h->start_thread[w] = pthread_self();
  pthread_getname_np(pthread_self(), h->names[w], sizeof h->names[w]);
  atomic_fetch_add(&h->starts[w], 1);
}
static void on_stop(void* ud, int w) {
  hooks_t* h = ud;
  h->stop_thread[w] = pthread_self();
  atomic_fetch_add(&h->stops[w], 1);
}
static void hook_task(void* arg) {
  hooks_t* h = arg;
  tl_pool_t* p = atomic_load(&h->pool);
  int w = tl_pool_worker_index(p);
  ASSERT(w >= 0 && w < HOOK_WORKERS);
  if (atomic_load(&h->starts[w]) == 1 && pthread_equal(h->start_thread[w], pthread_self()))
    atomic_fetch_add(&h->tasks_seen_started, 1);
  atomic_fetch_add(&h->index_ok, 1);
  atomic_store(&h->close_rc, tl_pool_close(p, 0));
  pthread_barrier_wait(&h->barrier); /* one task per worker */
}

TEST_IMPL(sched_hooks_and_identity) {
  static hooks_t h;
  ASSERT_EQ(pthread_barrier_init(&h.barrier, NULL, HOOK_WORKERS), 0);
  tl_pool_options_t o;
  tl_pool_options_default(&o);
  o.workers = HOOK_WORKERS;
  o.on_start = on_start;
  o.on_stop = on_stop;
  o.ud = &h;
  o.name = "tst";
  tl_pool_t* p = NULL;
  ASSERT_OK(tl_pool_init(&p, &o));
  atomic_store(&h.pool, p);
  for (int w = 0; w < HOOK_WORKERS; w++) { /* every on_start ran before init returned */
    ASSERT_EQ(h.starts[w], 1);
    ASSERT(!pthread_equal(h.start_thread[w], pthread_self()));
    char want[16];
    snprintf(want, sizeof want, "tst-%d", w);
    ASSERT_STR_EQ(h.names[w], want);
  }
  tl_group_t* g;
  ASSERT_OK(tl_group_init(&g));
  for (int i = 0; i < HOOK_WORKERS; i++) ASSERT_OK(tl_pool_submit(p, g, hook_task, NULL, &h));
  ASSERT_OK(tl_group_wait(g, NULL, -1));
  ASSERT_EQ(h.tasks_seen_started, HOOK_WORKERS);
  ASSERT_EQ(h.close_rc, TL_EBUSY);
  ASSERT_EQ(h.index_ok, HOOK_WORKERS);
  for (int w = 0; w < HOOK_WORKERS; w++) ASSERT_EQ(h.stops[w], 0);
  ASSERT_OK(tl_group_close(g));
  ASSERT_OK(tl_pool_close(p, 0));
  for (int w = 0; w < HOOK_WORKERS; w++) {
    ASSERT_EQ(h.starts[w], 1);
    ASSERT_EQ(h.stops[w], 1);
    ASSERT(pthread_equal(h.stop_thread[w], h.start_thread[w]));
  }
  pthread_barrier_destroy(&h.barrier);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Closing: cancel, drain, refuse
// ---------------------------------------------------------------------------------------------

typedef struct {
  tl_pool_t* pool;
  int cancel;
  int rc;
} closer_t;

static void* closer_main(void* arg) {
  closer_t* c = arg;
  c->rc = tl_pool_close(c->pool, c->cancel);
  return NULL;
}

/* Holds the workers, queues tasks, starts close in another thread, submits until the pool
 * refuses (TL_ECLOSED), then opens the gate. Every accepted task gets exactly one callback:
 * with cancel, cancel_fn for all of the queued ones. */
static int close_while_queued(int cancel) {
  enum { N = 500, EXTRA = 64 }; /* the queue holds N + EXTRA: a full queue answers EAGAIN */
  slot_t* s = calloc(N + EXTRA + 1, sizeof *s);
  gate_t gate;
  gate_init(&gate);
  tl_pool_t* p = make_pool(2, N + EXTRA);
  hold_workers(p, &gate);
  for (int i = 0; i < N; i++) ASSERT_OK(tl_pool_submit(p, NULL, slot_run, slot_cancel, &s[i]));
  closer_t c = {p, cancel, -1};
  pthread_t th;
  ASSERT_EQ(pthread_create(&th, NULL, closer_main, &c), 0);
  /* Until close has begun the submits are accepted; then they must be refused. */
  int accepted = N, rc;
  for (;;) { /* however long the closer takes to be scheduled */
    /* s has one slot more than the queue can hold: that one is never accepted */
    rc = tl_pool_try_submit(p, NULL, slot_run, slot_cancel, &s[accepted]);
    if (rc == 0) {
      accepted++;
      ASSERT(accepted <= N + EXTRA);
    } else if (rc != TL_EAGAIN) {
      break;
    }
    sched_yield();
  }
  ASSERT_EQ(rc, TL_ECLOSED);
  ASSERT_CONTAINS(tl_err_detail(), "closing");
  ASSERT_EQ(tl_pool_submit(p, NULL, slot_run, slot_cancel, &s[accepted]), TL_ECLOSED);
  sem_post_n(&gate.open, 2);
  ASSERT_EQ(pthread_join(th, NULL), 0);
  ASSERT_EQ(c.rc, 0);
  for (int i = 0; i < N + EXTRA; i++) {
    int want = i < accepted ? 1 : 0;
    ASSERT_EQ(s[i].ran + s[i].canceled, want);
    if (i < accepted) ASSERT_EQ(cancel ? s[i].canceled : s[i].ran, 1);
  }
  gate_destroy(&gate);
  free(s);
  return 0;
}

TEST_IMPL(sched_close_cancels_queued) { return close_while_queued(1); }
TEST_IMPL(sched_close_runs_queued) { return close_while_queued(0); }

/* Tasks that spawn children while the pool drains. */
typedef struct {
  tl_pool_t* pool;
  _Atomic int count;
} tree_t;
typedef struct {
  tree_t* tree;
  int depth;
} node_t;

static void tree_node(void* arg);
static void tree_spawn(tree_t* t, int depth) {
  node_t* n = malloc(sizeof *n);
  n->tree = t;
  n->depth = depth;
  ASSERT_OK(tl_pool_submit(t->pool, NULL, tree_node, NULL, n));
}
static void tree_node(void* arg) {
  node_t* n = arg;
  atomic_fetch_add(&n->tree->count, 1);
  if (n->depth > 0) {
    tree_spawn(n->tree, n->depth - 1);
    tree_spawn(n->tree, n->depth - 1);
  }
  free(n);
}

TEST_IMPL(sched_close_drains_spawned) {
  enum { DEPTH = 12 };
  static tree_t t;
  t.pool = make_pool(2, 0);
  for (int i = 0; i < 4; i++) tree_spawn(&t, DEPTH);
  ASSERT_OK(tl_pool_close(t.pool, 0)); /* the roots may not have started yet */
  ASSERT_EQ(t.count, 4 * ((1 << (DEPTH + 1)) - 1));
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Backpressure
// ---------------------------------------------------------------------------------------------

typedef struct {
  tl_pool_t* pool;
  slot_t* slot;
  sem_t done;
  int rc;
} blocked_submit_t;

static void* blocked_submit_main(void* arg) {
  blocked_submit_t* b = arg;
  b->rc = tl_pool_submit(b->pool, NULL, slot_run, slot_cancel, b->slot);
  sem_post(&b->done);
  return NULL;
}

TEST_IMPL(sched_backpressure) {
  enum { CAP = 4 };
  slot_t s[CAP + 2];
  memset(s, 0, sizeof s);
  gate_t gate;
  gate_init(&gate);
  tl_pool_t* p = make_pool(2, CAP);
  hold_workers(p, &gate);
  for (int i = 0; i < CAP; i++) ASSERT_OK(tl_pool_try_submit(p, NULL, slot_run, slot_cancel, &s[i]));
  ASSERT_EQ(tl_pool_try_submit(p, NULL, slot_run, slot_cancel, &s[CAP]), TL_EAGAIN);
  ASSERT_CONTAINS(tl_err_detail(), "full");
  blocked_submit_t b = {p, &s[CAP + 1], {{0}}, -1};
  ASSERT_EQ(sem_init(&b.done, 0, 0), 0);
  pthread_t th;
  ASSERT_EQ(pthread_create(&th, NULL, blocked_submit_main, &b), 0);
  ASSERT_EQ(sem_trywait(&b.done), -1); /* cannot have returned: the queue is full */
  sem_post_n(&gate.open, 2);            /* the workers drain the queue: the submit resumes */
  sem_wait_n(&b.done, 1);
  ASSERT_EQ(pthread_join(th, NULL), 0);
  ASSERT_EQ(b.rc, 0);
  ASSERT_OK(tl_pool_close(p, 0));
  for (int i = 0; i < CAP + 2; i++) ASSERT_EQ(s[i].ran, i == CAP ? 0 : 1);
  for (int i = 0; i < CAP + 2; i++) ASSERT_EQ(s[i].canceled, 0);
  sem_destroy(&b.done);
  gate_destroy(&gate);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Groups: nested waits, cancel, timeout
// ---------------------------------------------------------------------------------------------

typedef struct {
  tl_pool_t* pool;
  int n;
  long result;
} fib_t;

static void fib_task(void* arg) {
  fib_t* f = arg;
  if (f->n < 2) {
    f->result = f->n;
    return;
  }
  fib_t a = {f->pool, f->n - 1, 0}, b = {f->pool, f->n - 2, 0};
  tl_group_t* g;
  ASSERT_OK(tl_group_init(&g));
  ASSERT_OK(tl_pool_submit(f->pool, g, fib_task, NULL, &a));
  ASSERT_OK(tl_pool_submit(f->pool, g, fib_task, NULL, &b));
  ASSERT_OK(tl_group_wait(g, f->pool, -1)); /* runs tasks meanwhile: never deadlocks */
  ASSERT_OK(tl_group_close(g));
  f->result = a.result + b.result;
}

static long fib_seq(int n) { return n < 2 ? n : fib_seq(n - 1) + fib_seq(n - 2); }

TEST_IMPL(sched_nested_groups_fib) {
  const int n = SANITIZED ? 16 : 20;
  for (int workers = 1; workers <= 4; workers++) {
    tl_pool_t* p = make_pool(workers, 0);
    fib_t f = {p, n, 0};
    tl_group_t* g;
    ASSERT_OK(tl_group_init(&g));
    ASSERT_OK(tl_pool_submit(p, g, fib_task, NULL, &f));
    ASSERT_OK(tl_group_wait(g, p, -1)); /* p given, but main is no worker: it sleeps */
    ASSERT_EQ(f.result, fib_seq(n));
    ASSERT_OK(tl_group_close(g));
    tl_pool_stats_t st;
    ASSERT_OK(tl_pool_stats(p, &st));
    ASSERT_EQ(st.executed, 2 * fib_seq(n + 1) - 1); /* nodes of the call tree */
    ASSERT_OK(tl_pool_close(p, 0));
  }
  return 0;
}

TEST_IMPL(sched_group_cancel) {
  enum { N = 300 };
  slot_t s[N];
  memset(s, 0, sizeof s);
  gate_t gate;
  gate_init(&gate);
  tl_pool_t* p = make_pool(2, N);
  hold_workers(p, &gate);
  tl_group_t *g, *other;
  ASSERT_OK(tl_group_init(&g));
  ASSERT_OK(tl_group_init(&other));
  for (int i = 0; i < N; i++)
    ASSERT_OK(tl_pool_submit(p, i % 3 ? g : other, slot_run, i % 5 ? slot_cancel : NULL, &s[i]));
  ASSERT_EQ(tl_group_pending(g) + tl_group_pending(other), N);
  ASSERT_OK(tl_group_cancel(g));
  ASSERT_EQ(tl_pool_submit(p, g, slot_run, slot_cancel, &s[0]), TL_ECANCELED);
  ASSERT_EQ(tl_group_close(g), TL_EBUSY);
  sem_post_n(&gate.open, 2);
  ASSERT_OK(tl_group_wait(g, p, -1));
  ASSERT_OK(tl_group_wait(other, p, -1));
  for (int i = 0; i < N; i++) {
    if (i % 3 == 0) {
      ASSERT_EQ(s[i].ran, 1);
      ASSERT_EQ(s[i].canceled, 0);
    } else {
      ASSERT_EQ(s[i].ran, 0);
      ASSERT_EQ(s[i].canceled, i % 5 ? 1 : 0); /* a NULL cancel_fn is simply not called */
    }
  }
  tl_pool_stats_t st;
  ASSERT_OK(tl_pool_stats(p, &st));
  ASSERT_EQ(st.canceled, N - (N + 2) / 3);
  ASSERT_OK(tl_group_close(g));
  ASSERT_OK(tl_group_close(other));
  ASSERT_OK(tl_pool_close(p, 0));
  gate_destroy(&gate);
  return 0;
}

typedef struct {
  tl_pool_t* pool;
  tl_group_t* blocked;  /* a group whose only task sits in the gate */
  _Atomic int rc;
} waiter_t;

static void timed_waiter(void* arg) {
  waiter_t* w = arg;
  atomic_store(&w->rc, tl_group_wait(w->blocked, w->pool, 20));
}

TEST_IMPL(sched_group_wait_timeout) {
  gate_t gate;
  gate_init(&gate);
  tl_pool_t* p = make_pool(2, 0);
  tl_group_t* g;
  ASSERT_OK(tl_group_init(&g));
  ASSERT_OK(tl_group_wait(g, p, 0)); /* empty: done at once */
  ASSERT_OK(tl_pool_submit(p, g, gate_task, NULL, &gate));
  sem_wait_n(&gate.entered, 1);
  ASSERT_EQ(tl_group_wait(g, p, 0), TL_ETIMEDOUT);
  ASSERT_EQ(tl_group_wait(g, NULL, 30), TL_ETIMEDOUT);
  ASSERT_CONTAINS(tl_err_detail(), "1 task(s) still pending");
  /* From a worker: it helps (finds nothing), parks with a deadline and times out. */
  waiter_t w = {p, g, 1};
  tl_group_t* wg;
  ASSERT_OK(tl_group_init(&wg));
  ASSERT_OK(tl_pool_submit(p, wg, timed_waiter, NULL, &w));
  ASSERT_OK(tl_group_wait(wg, p, -1));
  ASSERT_EQ(w.rc, TL_ETIMEDOUT);
  ASSERT_EQ(tl_group_close(g), TL_EBUSY);
  sem_post_n(&gate.open, 1);
  ASSERT_OK(tl_group_wait(g, p, -1));
  ASSERT_OK(tl_group_close(g));
  ASSERT_OK(tl_group_close(wg));
  ASSERT_OK(tl_pool_close(p, 0));
  gate_destroy(&gate);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Stealing and pinning
// ---------------------------------------------------------------------------------------------

typedef struct {
  tl_pool_t* pool;
  _Atomic int spawner;   /* worker index of the spawning task */
  sem_t elsewhere;       /* posted once by a child running on another worker */
  _Atomic int posted;
  _Atomic int ran;
} steal_t;

static void steal_child(void* arg) {
  steal_t* s = arg;
  atomic_fetch_add(&s->ran, 1);
  if (tl_pool_worker_index(s->pool) != atomic_load(&s->spawner) && !atomic_exchange(&s->posted, 1))
    sem_post(&s->elsewhere);
}
static void steal_spawner(void* arg) {
  steal_t* s = arg;
  atomic_store(&s->spawner, tl_pool_worker_index(s->pool));
  for (int i = 0; i < 1000; i++) ASSERT_OK(tl_pool_submit(s->pool, NULL, steal_child, NULL, s));
  sem_wait_n(&s->elsewhere, 1); /* the other worker must steal some of them */
}

TEST_IMPL(sched_stealing) {
  static steal_t s;
  s.pool = make_pool(2, 0);
  ASSERT_EQ(sem_init(&s.elsewhere, 0, 0), 0);
  ASSERT_OK(tl_pool_submit(s.pool, NULL, steal_spawner, NULL, &s));
  tl_pool_stats_t st;
  do ASSERT_OK(tl_pool_stats(s.pool, &st));
  while (st.executed < 1001 && (sched_yield(), 1));
  ASSERT(st.stolen > 0);
  ASSERT_OK(tl_pool_close(s.pool, 0));
  ASSERT_EQ(s.ran, 1000);
  sem_destroy(&s.elsewhere);
  return 0;
}

enum { PIN_MAX = 64 };
typedef struct {
  tl_pool_t* pool;
  pthread_barrier_t all_in; /* one task per worker */
  char cpus[PIN_MAX][64];
} pin_probe_t;

static void pin_probe(void* arg) {
  pin_probe_t* pp = arg;
  int w = tl_pool_worker_index(pp->pool);
  ASSERT_OK(tl_pin_current(pp->cpus[w], sizeof pp->cpus[w]));
  pthread_barrier_wait(&pp->all_in);
}

TEST_IMPL(sched_pinned_by_plan) {
  tl_topo_t* t = NULL;
  ASSERT_OK(tl_topo_init(&t, NULL));
  tl_plan_spec_t spec;
  tl_plan_spec_default(&spec);
  spec.gpus = 0;
  spec.loaders_per_gpu = 2;
  spec.io_threads = 0;
  tl_plan_t* plan = NULL;
  ASSERT_OK(tl_plan_init(&plan, t, &spec));
  tl_topo_close(t);
  tl_pool_options_t o;
  tl_pool_options_default(&o);
  o.plan = plan;
  o.role = TL_ROLE_LAUNCH; /* no launch slots without GPUs */
  tl_pool_t* p = NULL;
  ASSERT_EQ(tl_pool_init(&p, &o), TL_EINVAL);
  o.role = TL_ROLE_LOADER;
  o.gpu = -1;
  ASSERT_OK(tl_pool_init(&p, &o));
  int n = tl_pool_size(p);
  ASSERT_EQ(n, 2); /* one per loader slot */
  tl_pool_stats_t st;
  ASSERT_OK(tl_pool_stats(p, &st));
  if (st.pinned_workers < n) {
    char why[256];
    snprintf(why, sizeof why, "%s", st.pin_refused);
    ASSERT(why[0] != '\0'); /* a refusal is recorded, never silent */
    ASSERT_OK(tl_pool_close(p, 0));
    tl_plan_close(plan);
    SKIP("this machine refused the pin: %s", why);
  }
  static pin_probe_t pp;
  pp.pool = p;
  ASSERT_EQ(pthread_barrier_init(&pp.all_in, NULL, (unsigned)n), 0);
  tl_group_t* g;
  ASSERT_OK(tl_group_init(&g));
  for (int i = 0; i < n; i++) ASSERT_OK(tl_pool_submit(p, g, pin_probe, NULL, &pp));
  ASSERT_OK(tl_group_wait(g, NULL, -1));
  /* Each worker sits on exactly one slot's PUs, and the two slots are both used. */
  int used[2] = {0, 0};
  for (int w = 0; w < n; w++) {
    int match = -1;
    for (int id = 0; id < tl_plan_size(plan); id++) {
      tl_plan_slot_t sl;
      ASSERT_OK(tl_plan_slot(plan, id, &sl));
      if (sl.role == TL_ROLE_LOADER && strcmp(sl.cpus, pp.cpus[w]) == 0) match = sl.rank;
    }
    if (match < 0) TL_FAIL_AT("worker %d runs on \"%s\", no loader slot's PUs", w, pp.cpus[w]);
    used[match]++;
  }
  ASSERT_EQ(used[0], 1);
  ASSERT_EQ(used[1], 1);
  ASSERT_OK(tl_group_close(g));
  ASSERT_OK(tl_pool_close(p, 0));
  tl_plan_close(plan); /* the pool let go of the plan when init returned */
  pthread_barrier_destroy(&pp.all_in);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Seeded stress: many submitters, recursive tasks, nested waits, cancellation
// ---------------------------------------------------------------------------------------------

#if defined(__SANITIZE_THREAD__)
enum { STRESS_SUBMITTERS = 3, STRESS_ROOTS = 40, STRESS_DEPTH = 4 };
#else
enum { STRESS_SUBMITTERS = 6, STRESS_ROOTS = 1000, STRESS_DEPTH = 6 };
#endif

static uint64_t mix(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}

typedef struct {
  tl_pool_t* pool;
  _Atomic long ran;
} stress_t;
typedef struct {
  stress_t* st;
  uint64_t seed;
  int depth;
  tl_group_t* group; /* the group it was submitted in: children it does not wait for join it */
} snode_t;

/* Children of a node: 0..3 by its seed, none at the depth limit. */
static int snode_children(uint64_t seed, int depth) { return depth >= STRESS_DEPTH ? 0 : (int)(seed % 4); }
static long stress_expected(uint64_t seed, int depth) {
  long n = 1;
  for (int i = 0, k = snode_children(seed, depth); i < k; i++) n += stress_expected(mix(seed + (uint64_t)i + 1), depth + 1);
  return n;
}

static void snode_run_owned(void* arg);
static void snode_run(void* arg) {
  snode_t* sn = arg;
  atomic_fetch_add(&sn->st->ran, 1);
  int k = snode_children(sn->seed, sn->depth);
  snode_t kids[4];
  tl_group_t* g = sn->group;
  bool wait = sn->seed & 16; /* half the nodes wait for their children from the worker */
  if (k && wait) ASSERT_OK(tl_group_init(&g));
  for (int i = 0; i < k; i++) {
    snode_t* c = wait ? &kids[i] : malloc(sizeof *c);
    c->st = sn->st;
    c->seed = mix(sn->seed + (uint64_t)i + 1);
    c->depth = sn->depth + 1;
    c->group = g;
    /* Children on the stack are waited for; heap ones free themselves. */
    ASSERT_OK(tl_pool_submit(sn->st->pool, g, wait ? snode_run : snode_run_owned, NULL, c));
  }
  if (k && wait) {
    ASSERT_OK(tl_group_wait(g, sn->st->pool, -1));
    ASSERT_OK(tl_group_close(g));
  }
}

typedef struct {
  stress_t* st;
  int id;
  long expected;
  snode_t* roots;
} submitter_t;

static void snode_free(void* arg) { free(arg); }
static void snode_run_owned(void* arg) {
  snode_run(arg);
  free(arg);
}

static void* submitter_main(void* arg) {
  submitter_t* s = arg;
  tl_group_t* g;
  ASSERT_OK(tl_group_init(&g));
  uint64_t rng = mix(0x5eed0000ull + (uint64_t)s->id);
  for (int r = 0; r < STRESS_ROOTS; r++) {
    rng = mix(rng);
    snode_t* root = malloc(sizeof *root);
    root->st = s->st;
    root->seed = rng;
    root->depth = 0;
    root->group = g;
    s->expected += stress_expected(rng, 0);
    int rc;
    if (rng & 1) {
      ASSERT_OK(tl_pool_submit(s->st->pool, g, snode_run_owned, snode_free, root));
    } else {
      while ((rc = tl_pool_try_submit(s->st->pool, g, snode_run_owned, snode_free, root)) == TL_EAGAIN)
        sched_yield();
      ASSERT_OK(rc);
    }
    if (r % 50 == 49) ASSERT_OK(tl_group_wait(g, s->st->pool, -1)); /* not a worker: sleeps */
  }
  ASSERT_OK(tl_group_wait(g, s->st->pool, -1));
  ASSERT_OK(tl_group_close(g));
  return NULL;
}

TEST_IMPL(sched_stress) {
  static stress_t st;
  st.pool = make_pool(4, 16);
  pthread_t th[STRESS_SUBMITTERS];
  submitter_t sub[STRESS_SUBMITTERS];
  for (int i = 0; i < STRESS_SUBMITTERS; i++) {
    sub[i] = (submitter_t){&st, i, 0, NULL};
    ASSERT_EQ(pthread_create(&th[i], NULL, submitter_main, &sub[i]), 0);
  }
  long expected = 0;
  for (int i = 0; i < STRESS_SUBMITTERS; i++) {
    ASSERT_EQ(pthread_join(th[i], NULL), 0);
    expected += sub[i].expected;
  }
  ASSERT_EQ(atomic_load(&st.ran), expected);
  tl_pool_stats_t s;
  ASSERT_OK(tl_pool_stats(st.pool, &s));
  ASSERT_EQ(s.executed, expected);
  ASSERT_EQ(s.injected, STRESS_SUBMITTERS * STRESS_ROOTS);
  ASSERT_OK(tl_pool_close(st.pool, 0));
  return 0;
}

// ---------------------------------------------------------------------------------------------
// close(cancel) cancels the injection queue at once, even while every worker is busy
// ---------------------------------------------------------------------------------------------

static sem_t busy_gate, busy_started, cancel_seen;
static _Atomic int busy_ran, prompt_canceled;

static void busy_task(void* arg) {
  (void)arg;
  sem_post(&busy_started);
  sem_wait(&busy_gate);
  atomic_fetch_add(&busy_ran, 1);
}
static void never_runs(void* arg) {
  (void)arg;
  TL_FAIL_AT("a task queued before close(cancel=1) ran");
}
static void counted_cancel(void* arg) {
  (void)arg;
  atomic_fetch_add(&prompt_canceled, 1);
  sem_post(&cancel_seen);
}
static void* cancel_closer_main(void* arg) {
  return (void*)(intptr_t)tl_pool_close(arg, 1);
}

TEST_IMPL(sched_close_cancel_is_prompt) {
  enum { QUEUED = 10 };
  sem_init(&busy_gate, 0, 0);
  sem_init(&busy_started, 0, 0);
  sem_init(&cancel_seen, 0, 0);
  tl_pool_t* pool = make_pool(1, 0);
  ASSERT_OK(tl_pool_submit(pool, NULL, busy_task, NULL, NULL));
  sem_wait(&busy_started); /* the only worker is now stuck in busy_task */
  for (int i = 0; i < QUEUED; i++) ASSERT_OK(tl_pool_submit(pool, NULL, never_runs, counted_cancel, NULL));
  pthread_t closer;
  ASSERT_EQ(pthread_create(&closer, NULL, cancel_closer_main, pool), 0);
  for (int i = 0; i < QUEUED; i++) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 10;
    ASSERT_EQ(sem_timedwait(&cancel_seen, &ts), 0); /* canceled while the worker is still busy */
  }
  ASSERT_EQ(atomic_load(&busy_ran), 0);
  sem_post(&busy_gate);
  void* rc;
  pthread_join(closer, &rc);
  ASSERT_EQ((intptr_t)rc, 0);
  ASSERT_EQ(atomic_load(&busy_ran), 1);
  ASSERT_EQ(atomic_load(&prompt_canceled), QUEUED);
  return 0;
}

/* Workers take injected tasks in batches into their own deques (pool.c, "Batches"): tasks that
 * a worker moved there and has not started yet, while it is stuck in a long task, are canceled
 * by close(cancel) at once too, not kept until the worker frees up. */
TEST_IMPL(sched_close_cancels_batched) {
  enum { QUEUED = 10 };
  sem_init(&busy_gate, 0, 0);
  sem_init(&busy_started, 0, 0);
  sem_init(&cancel_seen, 0, 0);
  gate_t gate;
  gate_init(&gate);
  tl_pool_t* pool = make_pool(1, 0);
  hold_workers(pool, &gate); /* the only worker waits in the gate while we queue */
  ASSERT_OK(tl_pool_submit(pool, NULL, busy_task, NULL, NULL));
  for (int i = 0; i < QUEUED; i++) ASSERT_OK(tl_pool_submit(pool, NULL, never_runs, counted_cancel, NULL));
  sem_post(&gate.open);
  /* The worker took its share of the injection queue (all 11 tasks: one worker) in one batch,
   * runs busy_task and holds the other 10 in its own deque. */
  sem_wait(&busy_started);
  pthread_t closer;
  ASSERT_EQ(pthread_create(&closer, NULL, cancel_closer_main, pool), 0);
  for (int i = 0; i < QUEUED; i++) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 10;
    ASSERT_EQ(sem_timedwait(&cancel_seen, &ts), 0); /* canceled while the worker is still busy */
  }
  ASSERT_EQ(atomic_load(&busy_ran), 0);
  sem_post(&busy_gate);
  void* rc;
  pthread_join(closer, &rc);
  ASSERT_EQ((intptr_t)rc, 0);
  ASSERT_EQ(atomic_load(&busy_ran), 1);
  ASSERT_EQ(atomic_load(&prompt_canceled), QUEUED);
  gate_destroy(&gate);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// No lost wake-up: producers submit bursts while the workers run dry, spin and park
// ---------------------------------------------------------------------------------------------

#define WAKE_PRODUCERS 3
#define WAKE_ROUNDS (SANITIZED ? 150 : 1500)
#define WAKE_BURST 12 /* at most this many outside submits per round, each may spawn one child */

typedef struct wake_item_s {
  _Atomic int ran;            /* times its fn ran: must end at exactly 1 */
  struct wake_item_s* child;  /* submitted by this task from its worker, or NULL */
  tl_pool_t* pool;            /* where the child goes */
  tl_group_t* group;          /* the producer's group */
} wake_item_t;

static void wake_item_run(void* arg) {
  wake_item_t* it = arg;
  atomic_fetch_add(&it->ran, 1);
  if (it->child) ASSERT_OK(tl_pool_submit(it->pool, it->group, wake_item_run, NULL, it->child));
}

typedef struct {
  tl_pool_t* pool;   /* the pool under test */
  int id;            /* seeds this producer */
  wake_item_t* items; /* WAKE_ROUNDS * WAKE_BURST * 2 slots */
  long used;         /* items handed out */
} wake_producer_t;

static void* wake_producer_main(void* arg) {
  wake_producer_t* w = arg;
  tl_group_t* g = NULL;
  ASSERT_OK(tl_group_init(&g));
  uint64_t rng = mix(0x1a57ull + (uint64_t)w->id);
  for (int r = 0; r < WAKE_ROUNDS; r++) {
    rng = mix(rng);
    int burst = 1 + (int)(rng % WAKE_BURST);
    for (int i = 0; i < burst; i++) {
      rng = mix(rng);
      wake_item_t* it = &w->items[w->used++];
      *it = (wake_item_t){0, NULL, w->pool, g};
      if (rng & 2) { /* a child spawned on a worker: the deque and finder wake-up paths */
        it->child = &w->items[w->used++];
        *it->child = (wake_item_t){0, NULL, w->pool, g};
      }
      if (rng & 1) {
        ASSERT_OK(tl_pool_submit(w->pool, g, wake_item_run, NULL, it)); /* may block: backpressure */
      } else {
        int rc;
        while ((rc = tl_pool_try_submit(w->pool, g, wake_item_run, NULL, it)) == TL_EAGAIN) sched_yield();
        ASSERT_OK(rc);
      }
    }
    /* Wait for the burst: the workers run out of work and spin or park before the next one,
     * so every round crosses the submit-versus-park handshake again. A lost wake-up hangs
     * here (the runner's timeout fails the test). */
    ASSERT_OK(tl_group_wait(g, w->pool, -1));
  }
  ASSERT_OK(tl_group_close(g));
  return NULL;
}

TEST_IMPL(sched_no_lost_wakeup) {
  tl_pool_t* pool = make_pool(3, 4); /* more workers than cores; a tiny injection queue */
  pthread_t th[WAKE_PRODUCERS];
  wake_producer_t prod[WAKE_PRODUCERS];
  for (int i = 0; i < WAKE_PRODUCERS; i++) {
    prod[i] = (wake_producer_t){pool, i, calloc((size_t)WAKE_ROUNDS * WAKE_BURST * 2, sizeof(wake_item_t)), 0};
    ASSERT(prod[i].items != NULL);
    ASSERT_EQ(pthread_create(&th[i], NULL, wake_producer_main, &prod[i]), 0);
  }
  long total = 0;
  for (int i = 0; i < WAKE_PRODUCERS; i++) {
    ASSERT_EQ(pthread_join(th[i], NULL), 0);
    for (long j = 0; j < prod[i].used; j++) ASSERT_EQ(atomic_load(&prod[i].items[j].ran), 1);
    total += prod[i].used;
  }
  tl_pool_stats_t s;
  ASSERT_OK(tl_pool_stats(pool, &s));
  ASSERT_EQ(s.executed, total);
  ASSERT_EQ(s.canceled, 0);
  ASSERT_OK(tl_pool_close(pool, 0));
  for (int i = 0; i < WAKE_PRODUCERS; i++) free(prod[i].items);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// tl_pool_stop_accepting: blocked and later external submits are refused, queued work still runs
// ---------------------------------------------------------------------------------------------

typedef struct {
  tl_pool_t* pool;
  slot_t* slot;
  sem_t about_to_block;
  int rc;
} stop_submit_t;

static void* stop_submitter(void* arg) {
  stop_submit_t* b = arg;
  sem_post(&b->about_to_block);
  b->rc = tl_pool_submit(b->pool, NULL, slot_run, slot_cancel, b->slot); /* queue full: waits */
  return NULL;
}

TEST_IMPL(sched_stop_accepting) {
  enum { CAP = 4 };
  slot_t s[CAP + 2];
  memset(s, 0, sizeof s);
  gate_t gate;
  gate_init(&gate);
  tl_pool_t* p = make_pool(1, CAP);
  hold_workers(p, &gate);
  for (int i = 0; i < CAP; i++) ASSERT_OK(tl_pool_submit(p, NULL, slot_run, slot_cancel, &s[i]));
  stop_submit_t b = {p, &s[CAP], {{0}}, -1};
  sem_init(&b.about_to_block, 0, 0);
  pthread_t th;
  ASSERT_EQ(pthread_create(&th, NULL, stop_submitter, &b), 0);
  sem_wait(&b.about_to_block);
  /* Whether the submitter already sleeps on the full queue or not yet, it must come back
   * refused: stop_accepting wakes the sleeper and refuses the late one. */
  tl_pool_stop_accepting(p);
  ASSERT_EQ(pthread_join(th, NULL), 0);
  ASSERT_EQ(b.rc, TL_ECLOSED);
  ASSERT_EQ(tl_pool_try_submit(p, NULL, slot_run, slot_cancel, &s[CAP + 1]), TL_ECLOSED);
  tl_pool_stop_accepting(p); /* idempotent */
  sem_post_n(&gate.open, 1);
  ASSERT_OK(tl_pool_close(p, 0));
  for (int i = 0; i < CAP; i++) ASSERT_EQ(s[i].ran, 1); /* queued before: still run */
  ASSERT_EQ(s[CAP].ran + s[CAP].canceled + s[CAP + 1].ran + s[CAP + 1].canceled, 0);
  gate_destroy(&gate);
  sem_destroy(&b.about_to_block);
  return 0;
}
