/* cudactx/nccl.c: NCCL, loaded on first use, behind a backend table.
 *
 * libthreadloom does not link NCCL: it is large, optional, and absent on many machines that
 * still run threadloom's CPU paths. The built-in table opens the library once (pthread_once)
 * with RTLD_LOCAL and keeps it open for the life of the process; every NCCL call of this part
 * goes through the table (internal.h), so tests inject failures through the path the real
 * library takes.
 *
 * Communicators: a tl_nccl_comm_t wraps one ncclComm_t. Invariant: `state` moves once from
 * LIVE to ABORTED (tl_nccl_comm_abort) or CLOSED (tl_nccl_comm_close) by an atomic exchange,
 * so exactly one of ncclCommAbort / ncclCommDestroy runs, whichever thread gets there first;
 * the handle itself is written once, before the struct is handed out. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cudactx/internal.h"

// ---------------------------------------------------------------------------------------------
// The built-in table: libnccl.so.2 through dlopen
// ---------------------------------------------------------------------------------------------

typedef int (*tl__nccl_get_version_fn)(int*);
typedef int (*tl__nccl_get_unique_id_fn)(tl__nccl_id_t*);
typedef int (*tl__nccl_comm_init_rank_fn)(void**, int, tl__nccl_id_t, int);
typedef int (*tl__nccl_comm_fn)(void*);
typedef const char* (*tl__nccl_error_string_fn)(int);

/* Written once under tl__nccl_once, read-only afterwards. */
static pthread_once_t tl__nccl_once = PTHREAD_ONCE_INIT;
static struct {
  void* handle;                              /* the dlopen handle, never closed */
  tl__nccl_get_version_fn get_version;       /* ncclGetVersion */
  tl__nccl_get_unique_id_fn get_unique_id;   /* ncclGetUniqueId */
  tl__nccl_comm_init_rank_fn comm_init_rank; /* ncclCommInitRank */
  tl__nccl_comm_fn comm_abort;               /* ncclCommAbort */
  tl__nccl_comm_fn comm_destroy;             /* ncclCommDestroy */
  tl__nccl_error_string_fn error_string;     /* ncclGetErrorString */
  char why[256];                             /* why loading failed; "" once loaded */
} tl__nccl;

static void tl__nccl_load(void) {
  tl__nccl.handle = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
  if (!tl__nccl.handle) {
    const char* e = dlerror();
    tl__strlcpy(tl__nccl.why, e ? e : "dlopen failed", sizeof tl__nccl.why);
    return;
  }
  static const char* const names[] = {"ncclGetVersion", "ncclGetUniqueId", "ncclCommInitRank",
                                      "ncclCommAbort", "ncclCommDestroy", "ncclGetErrorString"};
  void* syms[sizeof names / sizeof names[0]];
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    syms[i] = dlsym(tl__nccl.handle, names[i]);
    if (!syms[i]) {
      snprintf(tl__nccl.why, sizeof tl__nccl.why, "libnccl.so.2 has no %s", names[i]);
      return;
    }
  }
  *(void**)&tl__nccl.get_version = syms[0];
  *(void**)&tl__nccl.get_unique_id = syms[1];
  *(void**)&tl__nccl.comm_init_rank = syms[2];
  *(void**)&tl__nccl.comm_abort = syms[3];
  *(void**)&tl__nccl.comm_destroy = syms[4];
  *(void**)&tl__nccl.error_string = syms[5];
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
static int tl__dl_comm_init_rank(void** comm, int nranks, tl__nccl_id_t id, int rank) {
  return tl__nccl_loaded() ? tl__nccl.comm_init_rank(comm, nranks, id, rank) : TL__NCCL_NOT_LOADED;
}
static int tl__dl_comm_abort(void* comm) {
  return tl__nccl_loaded() ? tl__nccl.comm_abort(comm) : TL__NCCL_NOT_LOADED;
}
static int tl__dl_comm_destroy(void* comm) {
  return tl__nccl_loaded() ? tl__nccl.comm_destroy(comm) : TL__NCCL_NOT_LOADED;
}
static const char* tl__dl_error_string(int code) {
  return tl__nccl_loaded() ? tl__nccl.error_string(code) : "NCCL not loaded";
}
static const char* tl__dl_why(void) {
  tl__nccl_loaded();
  return tl__nccl.why;
}

const tl__nccl_api_t tl__nccl_builtin = {
    .name = "dlopen",
    .get_version = tl__dl_get_version,
    .get_unique_id = tl__dl_get_unique_id,
    .comm_init_rank = tl__dl_comm_init_rank,
    .comm_abort = tl__dl_comm_abort,
    .comm_destroy = tl__dl_comm_destroy,
    .error_string = tl__dl_error_string,
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

/* Translates an ncclResult_t of `call`: 0, TL_ENOLIB (not loaded) or TL_ENCCL with the name. */
static int tl__nccl_error(const tl__nccl_api_t* api, const char* call, int code) {
  if (code == TL__NCCL_SUCCESS) return 0;
  if (code == TL__NCCL_NOT_LOADED) return tl__fail(TL_ENOLIB, "NCCL: %s", api->why());
  const char* text = api->error_string(code);
  return tl__fail(TL_ENCCL, "%s returned ncclResult_t %d: %s", call, code, text ? text : "?");
}

// ---------------------------------------------------------------------------------------------
// Public calls
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

enum { TL__COMM_LIVE, TL__COMM_ABORTED, TL__COMM_CLOSED };

struct tl_nccl_comm_s {
  void* comm;         /* the ncclComm_t; written before the struct is handed out */
  _Atomic int state;  /* TL__COMM_*: shared by abort (any thread) and close */
};

int tl_nccl_comm_init(tl_nccl_comm_t** out, const tl_nccl_id_t* id, int nranks, int rank,
                      int device) {
  tl__clear_detail();
  if (!out || !id) return tl__fail(TL_EINVAL, "tl_nccl_comm_init: NULL argument");
  *out = NULL;
  if (nranks < 1 || rank < 0 || rank >= nranks)
    return tl__fail(TL_EINVAL, "tl_nccl_comm_init: rank %d is outside a world of %d", rank, nranks);
  if (device < 0) return tl__fail(TL_EINVAL, "tl_nccl_comm_init: device %d is negative", device);
  const tl__cuda_api_t* cuda = tl__cuda_api();
  if (!cuda->set_device)
    return tl__fail(TL_ENOSYS, "tl_nccl_comm_init: the CUDA backend \"%s\" cannot select a device",
                    cuda->name);
  int err = tl__cuda_error("cudaSetDevice", cuda->set_device(device));
  if (err) return err;
  tl_nccl_comm_t* c = calloc(1, sizeof *c);
  if (!c) return tl__fail(TL_ENOMEM, "tl_nccl_comm_init: out of memory");
  const tl__nccl_api_t* api = tl__nccl_api();
  tl__nccl_id_t raw;
  memcpy(raw.internal, id->bytes, sizeof raw.internal);
  err = tl__nccl_error(api, "ncclCommInitRank", api->comm_init_rank(&c->comm, nranks, raw, rank));
  if (err) {
    free(c);
    return err;
  }
  atomic_init(&c->state, TL__COMM_LIVE);
  *out = c;
  return 0;
}

int tl_nccl_comm_abort(tl_nccl_comm_t* comm) {
  tl__clear_detail();
  if (!comm) return tl__fail(TL_EINVAL, "tl_nccl_comm_abort: NULL communicator");
  int live = TL__COMM_LIVE;
  if (!atomic_compare_exchange_strong(&comm->state, &live, TL__COMM_ABORTED)) return 0;
  const tl__nccl_api_t* api = tl__nccl_api();
  return tl__nccl_error(api, "ncclCommAbort", api->comm_abort(comm->comm));
}

int tl_nccl_comm_close(tl_nccl_comm_t* comm) {
  tl__clear_detail();
  if (!comm) return 0;
  int err = 0;
  if (atomic_exchange(&comm->state, TL__COMM_CLOSED) == TL__COMM_LIVE) {
    const tl__nccl_api_t* api = tl__nccl_api();
    err = tl__nccl_error(api, "ncclCommDestroy", api->comm_destroy(comm->comm));
  }
  free(comm);
  return err;
}

int tl_nccl_comm_aborted(const tl_nccl_comm_t* comm) {
  return comm && atomic_load(&((tl_nccl_comm_t*)comm)->state) == TL__COMM_ABORTED;
}
