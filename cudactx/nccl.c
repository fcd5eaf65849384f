/* cudactx/nccl.c: NCCL, loaded on first use, behind a backend table: ids, communicators and the
 * collectives (allreduce, broadcast, allgather, reduce-scatter, groups).
 *
 * libthreadloom does not link NCCL: it is large, optional, and absent on many machines that
 * still run threadloom's CPU paths. The built-in table opens the library once (pthread_once)
 * with RTLD_LOCAL and keeps it open for the life of the process; every NCCL call of this part
 * goes through the table (internal.h), so tests inject failures through the path the real
 * library takes.
 *
 * Communicators are non-blocking (ncclConfig_t.blocking = 0): no NCCL call on them blocks; a
 * call may answer ncclInProgress, and tl__comm_wait then polls ncclCommGetAsyncError (backing
 * off from 50 us to 5 ms) until the communicator is ready, an asynchronous error shows, the
 * communicator's timeout passes or another thread aborts it. That is what makes init timeouts
 * and aborts possible without a thread stuck inside NCCL.
 *
 * Invariants of tl_nccl_comm_t (the concurrency contract of cudactx.h):
 * - `state` moves once, by an atomic exchange, from LIVE to ABORTED (tl_nccl_comm_abort, or an
 *   asynchronous error / timeout found by a wait) or CLOSED (tl_nccl_comm_close): whichever
 *   thread gets there first decides between ncclCommAbort and ncclCommDestroy.
 * - `lock` is held around every NCCL call that takes the ncclComm_t, and each such call first
 *   checks `state` under it. ncclCommAbort also runs under it, and sets `gone`. So no NCCL call
 *   reaches a communicator that ncclCommAbort freed: a call that loses the race sees ABORTED and
 *   fails with TL_ECANCELED. The lock is never held while sleeping or across user code, and the
 *   calls under it do not block (non-blocking communicator), so an abort waits at most one
 *   short NCCL call.
 * - `busy` counts open ncclGroupStart groups (of any thread) that queued work on the
 *   communicator: NCCL holds the ncclComm_t until that group's ncclGroupEnd, so an abort then is
 *   deferred (state is ABORTED at once, so new calls fail) and performed by the thread that ends
 *   the group, right after ncclGroupEnd.
 * - The per-thread group record (tl__group) is only touched by its own thread. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cudactx/internal.h"

// ---------------------------------------------------------------------------------------------
// The built-in table: libnccl.so.2 through dlopen
// ---------------------------------------------------------------------------------------------

/* ncclConfig_t as NCCL 2.14 defined it: NCCL reads `size` bytes of the caller's config, checks
 * the magic, and gives every field newer than `version` its default, so this prefix stays valid
 * with later releases (NCCL's parseCommConfig). Only `blocking` is set. */
typedef struct {
  size_t size;          /* bytes of the config the caller filled in */
  unsigned int magic;   /* 0xcafebeef */
  unsigned int version; /* NCCL_VERSION(2, 14, 0) = 21400 */
  int blocking;         /* 0: non-blocking communicator */
} tl__nccl_config_v21400_t;

typedef int (*tl__nccl_get_version_fn)(int*);
typedef int (*tl__nccl_get_unique_id_fn)(tl__nccl_id_t*);
typedef int (*tl__nccl_init_config_fn)(void**, int, tl__nccl_id_t, int, tl__nccl_config_v21400_t*);
typedef int (*tl__nccl_async_error_fn)(void*, int*);
typedef int (*tl__nccl_comm_fn)(void*);
typedef int (*tl__nccl_reduce_fn)(const void*, void*, size_t, int, int, void*, void*);
typedef int (*tl__nccl_gather_fn)(const void*, void*, size_t, int, void*, void*);
typedef int (*tl__nccl_void_fn)(void);
typedef const char* (*tl__nccl_error_string_fn)(int);
typedef const char* (*tl__nccl_last_error_fn)(void*);

/* Written once under tl__nccl_once, read-only afterwards. */
static pthread_once_t tl__nccl_once = PTHREAD_ONCE_INIT;
static struct {
  void* handle;                              /* the dlopen handle, never closed */
  tl__nccl_get_version_fn get_version;       /* ncclGetVersion */
  tl__nccl_get_unique_id_fn get_unique_id;   /* ncclGetUniqueId */
  tl__nccl_init_config_fn init_config;       /* ncclCommInitRankConfig (2.14+) */
  tl__nccl_async_error_fn async_error;       /* ncclCommGetAsyncError */
  tl__nccl_comm_fn comm_abort;               /* ncclCommAbort */
  tl__nccl_comm_fn comm_destroy;             /* ncclCommDestroy */
  tl__nccl_reduce_fn all_reduce;             /* ncclAllReduce */
  tl__nccl_reduce_fn broadcast;              /* ncclBroadcast (op slot: root) */
  tl__nccl_gather_fn all_gather;             /* ncclAllGather */
  tl__nccl_reduce_fn reduce_scatter;         /* ncclReduceScatter */
  tl__nccl_void_fn group_start;              /* ncclGroupStart */
  tl__nccl_void_fn group_end;                /* ncclGroupEnd */
  tl__nccl_last_error_fn last_error;         /* ncclGetLastError (2.13+) */
  tl__nccl_error_string_fn error_string;     /* ncclGetErrorString; set last: "loaded" */
  char why[256];                             /* why loading failed; "" once loaded */
} tl__nccl;

static void tl__nccl_load(void) {
  tl__nccl.handle = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
  if (!tl__nccl.handle) {
    const char* e = dlerror();
    tl__strlcpy(tl__nccl.why, e ? e : "dlopen failed", sizeof tl__nccl.why);
    return;
  }
  static const char* const names[] = {
      "ncclGetVersion", "ncclGetUniqueId", "ncclCommInitRankConfig", "ncclCommGetAsyncError",
      "ncclCommAbort", "ncclCommDestroy", "ncclAllReduce", "ncclBroadcast", "ncclAllGather",
      "ncclReduceScatter", "ncclGroupStart", "ncclGroupEnd", "ncclGetLastError",
      "ncclGetErrorString"};
  enum { N = sizeof names / sizeof names[0] };
  void* syms[N];
  for (size_t i = 0; i < N; i++) {
    syms[i] = dlsym(tl__nccl.handle, names[i]);
    if (!syms[i]) {
      snprintf(tl__nccl.why, sizeof tl__nccl.why,
               "libnccl.so.2 has no %s (threadloom needs NCCL 2.14 or newer)", names[i]);
      return;
    }
  }
  *(void**)&tl__nccl.get_version = syms[0];
  *(void**)&tl__nccl.get_unique_id = syms[1];
  *(void**)&tl__nccl.init_config = syms[2];
  *(void**)&tl__nccl.async_error = syms[3];
  *(void**)&tl__nccl.comm_abort = syms[4];
  *(void**)&tl__nccl.comm_destroy = syms[5];
  *(void**)&tl__nccl.all_reduce = syms[6];
  *(void**)&tl__nccl.broadcast = syms[7];
  *(void**)&tl__nccl.all_gather = syms[8];
  *(void**)&tl__nccl.reduce_scatter = syms[9];
  *(void**)&tl__nccl.group_start = syms[10];
  *(void**)&tl__nccl.group_end = syms[11];
  *(void**)&tl__nccl.last_error = syms[12];
  *(void**)&tl__nccl.error_string = syms[13];
}

/* 1 when every symbol is there. */
static int tl__nccl_loaded(void) {
  pthread_once(&tl__nccl_once, tl__nccl_load);
  return tl__nccl.error_string != NULL;
}

static int tl__dl_get_version(int* v) {
  return tl__nccl_loaded() ? tl__nccl.get_version(v) : TL__NCCL_NOT_LOADED;
}
static int tl__dl_get_unique_id(tl__nccl_id_t* id) {
  return tl__nccl_loaded() ? tl__nccl.get_unique_id(id) : TL__NCCL_NOT_LOADED;
}
static int tl__dl_comm_init_rank_config(void** comm, int nranks, tl__nccl_id_t id, int rank,
                                        int blocking) {
  if (!tl__nccl_loaded()) return TL__NCCL_NOT_LOADED;
  tl__nccl_config_v21400_t config = {
      .size = sizeof config, .magic = 0xcafebeef, .version = 21400, .blocking = blocking};
  return tl__nccl.init_config(comm, nranks, id, rank, &config);
}
static int tl__dl_comm_get_async_error(void* comm, int* state) {
  return tl__nccl_loaded() ? tl__nccl.async_error(comm, state) : TL__NCCL_NOT_LOADED;
}
static int tl__dl_comm_abort(void* comm) {
  return tl__nccl_loaded() ? tl__nccl.comm_abort(comm) : TL__NCCL_NOT_LOADED;
}
static int tl__dl_comm_destroy(void* comm) {
  return tl__nccl_loaded() ? tl__nccl.comm_destroy(comm) : TL__NCCL_NOT_LOADED;
}
static int tl__dl_all_reduce(const void* send, void* recv, size_t count, int dtype, int op,
                             void* comm, void* stream) {
  return tl__nccl_loaded() ? tl__nccl.all_reduce(send, recv, count, dtype, op, comm, stream)
                           : TL__NCCL_NOT_LOADED;
}
static int tl__dl_broadcast(const void* send, void* recv, size_t count, int dtype, int root,
                            void* comm, void* stream) {
  return tl__nccl_loaded() ? tl__nccl.broadcast(send, recv, count, dtype, root, comm, stream)
                           : TL__NCCL_NOT_LOADED;
}
static int tl__dl_all_gather(const void* send, void* recv, size_t count, int dtype, void* comm,
                             void* stream) {
  return tl__nccl_loaded() ? tl__nccl.all_gather(send, recv, count, dtype, comm, stream)
                           : TL__NCCL_NOT_LOADED;
}
static int tl__dl_reduce_scatter(const void* send, void* recv, size_t count, int dtype, int op,
                                 void* comm, void* stream) {
  return tl__nccl_loaded() ? tl__nccl.reduce_scatter(send, recv, count, dtype, op, comm, stream)
                           : TL__NCCL_NOT_LOADED;
}
static int tl__dl_group_start(void) {
  return tl__nccl_loaded() ? tl__nccl.group_start() : TL__NCCL_NOT_LOADED;
}
static int tl__dl_group_end(void) {
  return tl__nccl_loaded() ? tl__nccl.group_end() : TL__NCCL_NOT_LOADED;
}
static const char* tl__dl_error_string(int code) {
  return tl__nccl_loaded() ? tl__nccl.error_string(code) : "NCCL not loaded";
}
static const char* tl__dl_last_error(void* comm) {
  return tl__nccl_loaded() ? tl__nccl.last_error(comm) : "";
}
static const char* tl__dl_why(void) {
  tl__nccl_loaded();
  return tl__nccl.why;
}

const tl__nccl_api_t tl__nccl_builtin = {
    .name = "dlopen",
    .get_version = tl__dl_get_version,
    .get_unique_id = tl__dl_get_unique_id,
    .comm_init_rank_config = tl__dl_comm_init_rank_config,
    .comm_get_async_error = tl__dl_comm_get_async_error,
    .comm_abort = tl__dl_comm_abort,
    .comm_destroy = tl__dl_comm_destroy,
    .all_reduce = tl__dl_all_reduce,
    .broadcast = tl__dl_broadcast,
    .all_gather = tl__dl_all_gather,
    .reduce_scatter = tl__dl_reduce_scatter,
    .group_start = tl__dl_group_start,
    .group_end = tl__dl_group_end,
    .error_string = tl__dl_error_string,
    .last_error = tl__dl_last_error,
    .why = tl__dl_why,
};

static _Atomic(const tl__nccl_api_t*) tl__nccl_table = NULL; /* NULL: the built-in one */

const tl__nccl_api_t* tl__nccl_api(void) {
  const tl__nccl_api_t* a = atomic_load_explicit(&tl__nccl_table, memory_order_acquire);
  return a ? a : &tl__nccl_builtin;
}

const tl__nccl_api_t* tl__nccl_set_api(const tl__nccl_api_t* api) {
  const tl__nccl_api_t* prev = atomic_exchange_explicit(&tl__nccl_table, api, memory_order_acq_rel);
  return prev ? prev : &tl__nccl_builtin;
}

/* Translates an ncclResult_t of `call`: 0, TL_ENOLIB (not loaded) or TL_ENCCL with NCCL's name
 * for the code and, when `comm` is given (and still valid: the caller holds its lock), NCCL's
 * last message about it. */
static int tl__nccl_error_on(const tl__nccl_api_t* api, const char* call, int code, void* comm) {
  if (code == TL__NCCL_SUCCESS) return 0;
  if (code == TL__NCCL_NOT_LOADED) return tl__fail(TL_ENOLIB, "NCCL: %s", api->why());
  const char* text = api->error_string(code);
  const char* last = comm && api->last_error ? api->last_error(comm) : NULL;
  if (last && last[0])
    return tl__fail(TL_ENCCL, "%s returned ncclResult_t %d: %s (NCCL: %s)", call, code,
                    text ? text : "?", last);
  return tl__fail(TL_ENCCL, "%s returned ncclResult_t %d: %s", call, code, text ? text : "?");
}

static int tl__nccl_error(const tl__nccl_api_t* api, const char* call, int code) {
  return tl__nccl_error_on(api, call, code, NULL);
}

// ---------------------------------------------------------------------------------------------
// Ids and versions
// ---------------------------------------------------------------------------------------------

int tl_nccl_version(int* version) {
  tl__clear_detail();
  if (!version) return tl__fail(TL_EINVAL, "tl_nccl_version: NULL argument");
  *version = 0;
  const tl__nccl_api_t* api = tl__nccl_api();
  return tl__nccl_error(api, "ncclGetVersion", api->get_version(version));
}

int tl_nccl_unique_id(tl_nccl_id_t* out) {
  tl__clear_detail();
  if (!out) return tl__fail(TL_EINVAL, "tl_nccl_unique_id: NULL argument");
  const tl__nccl_api_t* api = tl__nccl_api();
  tl__nccl_id_t id;
  memset(&id, 0, sizeof id);
  int err = tl__nccl_error(api, "ncclGetUniqueId", api->get_unique_id(&id));
  if (err == 0) memcpy(out->bytes, id.internal, sizeof out->bytes);
  return err;
}

// ---------------------------------------------------------------------------------------------
// Communicators
// ---------------------------------------------------------------------------------------------

enum { TL__COMM_LIVE, TL__COMM_ABORTED, TL__COMM_CLOSED };

struct tl_nccl_comm_s {
  void* comm;            /* the ncclComm_t; written before the struct is handed out; passed to
                            NCCL only under `lock` while state is LIVE (or busy > 0) */
  pthread_mutex_t lock;  /* held around every NCCL call on comm; never while sleeping */
  _Atomic int state;     /* TL__COMM_*: read by every call, written once by abort/close/a wait */
  int gone;              /* under lock: 1 once ncclCommAbort ran (comm is freed) */
  int busy;              /* under lock: open groups (any thread) with work queued on comm */
  int nranks, rank;      /* the world; written once */
  int timeout_ms;        /* bound on each ncclInProgress wait; negative: none; written once */
};

/* Runs ncclCommAbort unless a group still holds the communicator or it already ran. `lock`
 * held, state already ABORTED. Returns NCCL's code (ncclInProgress counts as done: the
 * communicator may not be polled after an abort). */
static int tl__comm_abort_locked(tl_nccl_comm_t* c, const tl__nccl_api_t* api) {
  if (c->busy > 0 || c->gone) return TL__NCCL_SUCCESS;
  c->gone = 1;
  int rc = api->comm_abort(c->comm);
  return rc == TL__NCCL_IN_PROGRESS ? TL__NCCL_SUCCESS : rc;
}

/* Aborts after a failure found by this part (asynchronous error, timeout). `lock` held. */
static void tl__comm_fail_locked(tl_nccl_comm_t* c, const tl__nccl_api_t* api) {
  int live = TL__COMM_LIVE;
  if (atomic_compare_exchange_strong(&c->state, &live, TL__COMM_ABORTED))
    (void)tl__comm_abort_locked(c, api);
}

static int64_t tl__now_ms(void) { return tl__now_ns() / 1000000; }

/* Waits, without holding the lock, until the communicator leaves ncclInProgress. 0 when ready;
 * TL_ECANCELED when aborted meanwhile; TL_ENCCL (asynchronous error) or TL_ETIMEDOUT after
 * aborting it. `call` names what is waited for in the detail. */
static int tl__comm_wait(tl_nccl_comm_t* c, const tl__nccl_api_t* api, const char* call) {
  int64_t deadline = c->timeout_ms < 0 ? -1 : tl__now_ms() + c->timeout_ms;
  long delay_us = 50;
  for (;;) {
    pthread_mutex_lock(&c->lock);
    if (atomic_load(&c->state) != TL__COMM_LIVE) {
      pthread_mutex_unlock(&c->lock);
      return tl__fail(TL_ECANCELED, "%s: the NCCL communicator was aborted", call);
    }
    int state = TL__NCCL_IN_PROGRESS;
    int rc = api->comm_get_async_error(c->comm, &state);
    int err = 0;
    if (rc != TL__NCCL_SUCCESS) {
      err = tl__nccl_error_on(api, "ncclCommGetAsyncError", rc, c->comm);
    } else if (state != TL__NCCL_SUCCESS && state != TL__NCCL_IN_PROGRESS) {
      const char* text = api->error_string(state);
      const char* last = api->last_error ? api->last_error(c->comm) : "";
      err = tl__fail(TL_ENCCL, "%s: asynchronous NCCL error, ncclResult_t %d: %s%s%s%s; the "
                     "communicator was aborted", call, state, text ? text : "?",
                     last && last[0] ? " (NCCL: " : "", last && last[0] ? last : "",
                     last && last[0] ? ")" : "");
    } else if (state == TL__NCCL_IN_PROGRESS && deadline >= 0 && tl__now_ms() >= deadline) {
      err = tl__fail(TL_ETIMEDOUT, "%s: NCCL still in progress after %d ms (a rank that never "
                     "joined, or a hung peer); the communicator was aborted", call,
                     c->timeout_ms);
    } else if (state == TL__NCCL_SUCCESS) {
      pthread_mutex_unlock(&c->lock);
      return 0;
    }
    if (err) {
      tl__comm_fail_locked(c, api);
      pthread_mutex_unlock(&c->lock);
      return err;
    }
    pthread_mutex_unlock(&c->lock);
    struct timespec ts = {0, delay_us * 1000};
    nanosleep(&ts, NULL);
    if (delay_us < 5000) delay_us *= 2;
  }
}

int tl_nccl_comm_init(tl_nccl_comm_t** out, const tl_nccl_id_t* id, int nranks, int rank,
                      int device, int timeout_ms) {
  tl__clear_detail();
  if (!out || !id) return tl__fail(TL_EINVAL, "tl_nccl_comm_init: NULL argument");
  *out = NULL;
  if (nranks < 1 || rank < 0 || rank >= nranks)
    return tl__fail(TL_EINVAL, "tl_nccl_comm_init: rank %d is outside a world of %d", rank, nranks);
  if (device < 0) return tl__fail(TL_EINVAL, "tl_nccl_comm_init: device %d is negative", device);
  const tl__dev_api_t* cuda = tl__cuda_api();
  if (!cuda->set_device)
    return tl__fail(TL_ENOSYS, "tl_nccl_comm_init: the CUDA backend \"%s\" cannot select a device",
                    cuda->name);
  int err = tl__cuda_error("cudaSetDevice", cuda->set_device(device));
  if (err) return err;
  tl_nccl_comm_t* c = calloc(1, sizeof *c);
  if (!c) return tl__fail(TL_ENOMEM, "tl_nccl_comm_init: out of memory");
  pthread_mutex_init(&c->lock, NULL);
  atomic_init(&c->state, TL__COMM_LIVE);
  c->nranks = nranks;
  c->rank = rank;
  c->timeout_ms = timeout_ms;
  const tl__nccl_api_t* api = tl__nccl_api();
  tl__nccl_id_t raw;
  memcpy(raw.internal, id->bytes, sizeof raw.internal);
  int rc = api->comm_init_rank_config(&c->comm, nranks, raw, rank, 0);
  if (rc != TL__NCCL_SUCCESS && rc != TL__NCCL_IN_PROGRESS) {
    err = tl__nccl_error_on(api, "ncclCommInitRankConfig", rc, c->comm);
    if (c->comm) (void)api->comm_abort(c->comm); /* a half-made communicator */
  } else {
    err = tl__comm_wait(c, api, "ncclCommInitRankConfig"); /* aborts it on failure */
  }
  if (err) {
    pthread_mutex_destroy(&c->lock);
    free(c);
    return err;
  }
  *out = c;
  return 0;
}

int tl_nccl_comm_abort(tl_nccl_comm_t* comm) {
  tl__clear_detail();
  if (!comm) return tl__fail(TL_EINVAL, "tl_nccl_comm_abort: NULL communicator");
  int live = TL__COMM_LIVE;
  if (!atomic_compare_exchange_strong(&comm->state, &live, TL__COMM_ABORTED)) return 0;
  const tl__nccl_api_t* api = tl__nccl_api();
  pthread_mutex_lock(&comm->lock);
  int rc = tl__comm_abort_locked(comm, api);
  pthread_mutex_unlock(&comm->lock);
  return tl__nccl_error(api, "ncclCommAbort", rc);
}

int tl_nccl_comm_close(tl_nccl_comm_t* comm) {
  tl__clear_detail();
  if (!comm) return 0;
  int err = 0;
  if (atomic_exchange(&comm->state, TL__COMM_CLOSED) == TL__COMM_LIVE) {
    const tl__nccl_api_t* api = tl__nccl_api();
    int rc = api->comm_destroy(comm->comm);
    err = tl__nccl_error(api, "ncclCommDestroy", rc == TL__NCCL_IN_PROGRESS ? 0 : rc);
  }
  pthread_mutex_destroy(&comm->lock);
  free(comm);
  return err;
}

int tl_nccl_comm_aborted(const tl_nccl_comm_t* comm) {
  return comm && atomic_load(&((tl_nccl_comm_t*)comm)->state) == TL__COMM_ABORTED;
}

int tl_nccl_comm_check(tl_nccl_comm_t* comm) {
  tl__clear_detail();
  if (!comm) return tl__fail(TL_EINVAL, "tl_nccl_comm_check: NULL communicator");
  const tl__nccl_api_t* api = tl__nccl_api();
  pthread_mutex_lock(&comm->lock);
  int err = 0;
  if (atomic_load(&comm->state) != TL__COMM_LIVE) {
    err = tl__fail(TL_ECANCELED, "tl_nccl_comm_check: the NCCL communicator was aborted");
  } else {
    int state = TL__NCCL_SUCCESS;
    int rc = api->comm_get_async_error(comm->comm, &state);
    if (rc == TL__NCCL_SUCCESS && state != TL__NCCL_SUCCESS && state != TL__NCCL_IN_PROGRESS)
      rc = state;
    if (rc != TL__NCCL_SUCCESS) {
      err = tl__nccl_error_on(api, "ncclCommGetAsyncError", rc, comm->comm);
      tl__comm_fail_locked(comm, api);
    }
  }
  pthread_mutex_unlock(&comm->lock);
  return err;
}

// ---------------------------------------------------------------------------------------------
// Element types and reductions
// ---------------------------------------------------------------------------------------------

/* ncclDataType_t of a DLPack dtype and its size, or TL_EINVAL naming what NCCL takes. */
static int tl__nccl_dtype(tl_dtype_t d, int* nccl, size_t* size) {
  int t = -1;
  if (d.lanes == 1) {
    switch (d.code) {
      case TL_DTYPE_INT: t = d.bits == 8 ? 0 : d.bits == 32 ? 2 : d.bits == 64 ? 4 : -1; break;
      case TL_DTYPE_UINT: t = d.bits == 8 ? 1 : d.bits == 32 ? 3 : d.bits == 64 ? 5 : -1; break;
      case TL_DTYPE_FLOAT: t = d.bits == 16 ? 6 : d.bits == 32 ? 7 : d.bits == 64 ? 8 : -1; break;
      case TL_DTYPE_BFLOAT: t = d.bits == 16 ? 9 : -1; break;
    }
  }
  if (t < 0)
    return tl__fail(TL_EINVAL, "DLPack dtype (code %u, bits %u, lanes %u) has no NCCL type: NCCL "
                    "takes int8/32/64, uint8/32/64, float16/32/64 and bfloat16 with lanes 1 "
                    "(cast int16/bool tensors first)", d.code, d.bits, d.lanes);
  *nccl = t;
  *size = d.bits / 8;
  return 0;
}

int tl_nccl_dtype_size(tl_dtype_t dtype, size_t* size) {
  tl__clear_detail();
  if (!size) return tl__fail(TL_EINVAL, "tl_nccl_dtype_size: NULL argument");
  int t;
  return tl__nccl_dtype(dtype, &t, size);
}


/* ncclRedOp_t of op (the enums agree: ncclSum = 0 ... ncclAvg = 4), or TL_EINVAL. */
static int tl__nccl_op(tl_nccl_op_t op, tl_dtype_t d, const char* call) {
  if ((int)op < TL_NCCL_SUM || op > TL_NCCL_AVG)
    return tl__fail(TL_EINVAL, "%s: op %d is not a tl_nccl_op_t", call, (int)op);
  if (op == TL_NCCL_AVG && (d.code == TL_DTYPE_INT || d.code == TL_DTYPE_UINT))
    return tl__fail(TL_EINVAL, "%s: op avg on an integer dtype would truncate; use sum and "
                    "divide, or a float dtype (CpuComm refuses it too)", call);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Collectives and groups
// ---------------------------------------------------------------------------------------------

/* The calling thread's open groups: depth, and the communicators with work queued in them
 * (each counted once in its `busy`). Touched by its own thread only. */
static _Thread_local struct {
  int depth;
  int n;
  tl_nccl_comm_t* comms[TL_NCCL_GROUP_MAX];
} tl__group;

enum { TL__ALLREDUCE, TL__BROADCAST, TL__ALLGATHER, TL__REDUCE_SCATTER };

typedef struct {
  int kind;          /* TL__* */
  const char* call;  /* the NCCL function, for messages */
  const void* send;
  void* recv;
  size_t count;      /* as NCCL takes it (allgather: sendcount, reduce-scatter: recvcount) */
  int dtype;         /* ncclDataType_t */
  int arg;           /* ncclRedOp_t, or the root of a broadcast */
  void* stream;
} tl__coll_t;

static int tl__coll_call(const tl__nccl_api_t* api, const tl__coll_t* a, void* comm) {
  switch (a->kind) {
    case TL__ALLREDUCE:
      return api->all_reduce(a->send, a->recv, a->count, a->dtype, a->arg, comm, a->stream);
    case TL__BROADCAST:
      return api->broadcast(a->send, a->recv, a->count, a->dtype, a->arg, comm, a->stream);
    case TL__ALLGATHER:
      return api->all_gather(a->send, a->recv, a->count, a->dtype, comm, a->stream);
    default:
      return api->reduce_scatter(a->send, a->recv, a->count, a->dtype, a->arg, comm, a->stream);
  }
}

/* Enqueues one collective: under the lock (state checked first), then, outside a group, waits
 * for ncclInProgress to clear. */
static int tl__collective(tl_nccl_comm_t* c, const tl__coll_t* a) {
  const tl__nccl_api_t* api = tl__nccl_api();
  int err = 0;
  pthread_mutex_lock(&c->lock);
  if (atomic_load(&c->state) != TL__COMM_LIVE) {
    pthread_mutex_unlock(&c->lock);
    return tl__fail(TL_ECANCELED, "%s: the NCCL communicator was aborted", a->call);
  }
  int grouped = tl__group.depth > 0;
  if (grouped) {
    int seen = 0;
    for (int i = 0; i < tl__group.n && !seen; i++) seen = tl__group.comms[i] == c;
    if (!seen) {
      if (tl__group.n == TL_NCCL_GROUP_MAX) {
        pthread_mutex_unlock(&c->lock);
        return tl__fail(TL_EINVAL, "%s: more than %d communicators in one NCCL group", a->call,
                        TL_NCCL_GROUP_MAX);
      }
      tl__group.comms[tl__group.n++] = c;
      c->busy++;
    }
  }
  int rc = tl__coll_call(api, a, c->comm);
  if (rc != TL__NCCL_SUCCESS && rc != TL__NCCL_IN_PROGRESS)
    err = tl__nccl_error_on(api, a->call, rc, c->comm);
  pthread_mutex_unlock(&c->lock);
  if (err || grouped || rc == TL__NCCL_SUCCESS) return err;
  return tl__comm_wait(c, api, a->call);
}

/* Checks what every collective shares (send may be NULL where send_optional); fills a->dtype. */
static int tl__coll_check(tl_nccl_comm_t* c, tl__coll_t* a, tl_dtype_t dtype, size_t per_rank,
                          int send_optional) {
  if (!c) return tl__fail(TL_EINVAL, "%s: NULL communicator", a->call);
  size_t size;
  int err = tl__nccl_dtype(dtype, &a->dtype, &size);
  if (err) return err;
  if (a->count > 0 && ((!a->send && !send_optional) || !a->recv))
    return tl__fail(TL_EINVAL, "%s: NULL buffer for %zu elements", a->call, a->count);
  if (a->count > SIZE_MAX / size / per_rank)
    return tl__fail(TL_EINVAL, "%s: %zu elements of %zu bytes (x %zu ranks) overflow size_t",
                    a->call, a->count, size, per_rank);
  return 0;
}

int tl_nccl_allreduce(tl_nccl_comm_t* comm, const void* send, void* recv, size_t count,
                      tl_dtype_t dtype, tl_nccl_op_t op, void* stream) {
  tl__clear_detail();
  tl__coll_t a = {TL__ALLREDUCE, "ncclAllReduce", send, recv, count, 0, (int)op, stream};
  int err = tl__coll_check(comm, &a, dtype, 1, 0);
  if (!err) err = tl__nccl_op(op, dtype, a.call);
  return err ? err : tl__collective(comm, &a);
}

int tl_nccl_broadcast(tl_nccl_comm_t* comm, const void* send, void* recv, size_t count,
                      tl_dtype_t dtype, int root, void* stream) {
  tl__clear_detail();
  tl__coll_t a = {TL__BROADCAST, "ncclBroadcast", send, recv, count, 0, root, stream};
  int err = tl__coll_check(comm, &a, dtype, 1, comm && comm->rank != root);
  if (err) return err;
  if (root < 0 || root >= comm->nranks)
    return tl__fail(TL_EINVAL, "ncclBroadcast: root %d is outside a world of %d", root,
                    comm->nranks);
  return tl__collective(comm, &a);
}

int tl_nccl_allgather(tl_nccl_comm_t* comm, const void* send, void* recv, size_t sendcount,
                      tl_dtype_t dtype, void* stream) {
  tl__clear_detail();
  tl__coll_t a = {TL__ALLGATHER, "ncclAllGather", send, recv, sendcount, 0, 0, stream};
  int err = tl__coll_check(comm, &a, dtype, comm ? (size_t)comm->nranks : 1, 0);
  return err ? err : tl__collective(comm, &a);
}

int tl_nccl_reduce_scatter(tl_nccl_comm_t* comm, const void* send, void* recv, size_t recvcount,
                           tl_dtype_t dtype, tl_nccl_op_t op, void* stream) {
  tl__clear_detail();
  tl__coll_t a = {TL__REDUCE_SCATTER, "ncclReduceScatter", send, recv, recvcount, 0, (int)op,
                  stream};
  int err = tl__coll_check(comm, &a, dtype, comm ? (size_t)comm->nranks : 1, 0);
  if (!err) err = tl__nccl_op(op, dtype, a.call);
  return err ? err : tl__collective(comm, &a);
}

int tl_nccl_group_start(void) {
  tl__clear_detail();
  const tl__nccl_api_t* api = tl__nccl_api();
  int err = tl__nccl_error(api, "ncclGroupStart", api->group_start());
  if (!err) tl__group.depth++;
  return err;
}

int tl_nccl_group_end(void) {
  tl__clear_detail();
  if (tl__group.depth == 0)
    return tl__fail(TL_EINVAL, "tl_nccl_group_end: no group is open on this thread (call "
                    "tl_nccl_group_start first)");
  const tl__nccl_api_t* api = tl__nccl_api();
  int rc = api->group_end();
  tl__group.depth--;
  int err = rc == TL__NCCL_IN_PROGRESS ? 0 : tl__nccl_error(api, "ncclGroupEnd", rc);
  if (tl__group.depth > 0) return err;
  /* The outermost end: NCCL is done holding the communicators; run deferred aborts, then wait
   * for the live ones (the first failure is reported). */
  int n = tl__group.n;
  tl_nccl_comm_t* comms[TL_NCCL_GROUP_MAX];
  memcpy(comms, tl__group.comms, sizeof(comms[0]) * (size_t)n);
  tl__group.n = 0;
  for (int i = 0; i < n; i++) {
    pthread_mutex_lock(&comms[i]->lock);
    comms[i]->busy--;
    if (atomic_load(&comms[i]->state) == TL__COMM_ABORTED) (void)tl__comm_abort_locked(comms[i], api);
    pthread_mutex_unlock(&comms[i]->lock);
  }
  for (int i = 0; i < n && !err; i++) err = tl__comm_wait(comms[i], api, "ncclGroupEnd");
  return err;
}
