/* tests/c/test-cudactx.c: CUDA discovery without a driver (the real runtime on this machine),
 * with faults injected through the backend table, and on a real GPU (skipped without one). */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>

#include "cudactx/internal.h"
#include "task.h"
#include "threadloom/threadloom.h"

TEST_IMPL(cuda_without_driver) {
  int v = -1;
  if (!tl_cuda_built()) {
    ASSERT_EQ(tl_cuda_runtime_version(&v), TL_ENOSYS);
    ASSERT_EQ(tl_cuda_device_count(&v), TL_ENOSYS);
    ASSERT_CONTAINS(tl_err_detail(), "TL_WITH_CUDA=OFF");
    return 0;
  }
  ASSERT_OK(tl_cuda_runtime_version(&v));
  ASSERT(v >= 12000);
  int drv = -1;
  if (tl_cuda_driver_version(&drv) == 0) SKIP("a CUDA driver is installed (version %d)", drv);
  ASSERT_EQ(drv, 0);
  int n = -1;
  int err = tl_cuda_device_count(&n);
  ASSERT_EQ(err, TL_ENODRIVER);
  ASSERT_EQ(n, 0);
  ASSERT_CONTAINS(tl_err_detail(), "cudaGetDeviceCount: cudaError");
  tl_gpu_info_t info;
  ASSERT_EQ(tl_cuda_device_info(0, &info), TL_ENODRIVER);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// A fake runtime: the counts and failures a test sets
// ---------------------------------------------------------------------------------------------

static int fake_count_rc, fake_count;

static int fake_version(int* v) {
  *v = 13000;
  return 0;
}
static int fake_device_count(int* n) {
  *n = fake_count;
  return fake_count_rc;
}
static int fake_device_info(int dev, tl_gpu_info_t* out) {
  memset(out, 0, sizeof *out);
  out->index = dev;
  snprintf(out->name, sizeof out->name, "Fake GPU %d", dev);
  out->total_mem = (size_t)80 << 30;
  return dev == 1 ? 700 /* cudaErrorIllegalAddress, sticky */ : 0;
}
static const char* fake_error_name(int code) { return code == 700 ? "cudaErrorIllegalAddress" : "cudaErrorFake"; }
static const char* fake_error_string(int code) {
  (void)code;
  return "fake failure";
}

static const tl__dev_api_t fake_api = {
    .name = "fake",
    .runtime_version = fake_version,
    .driver_version = fake_version,
    .device_count = fake_device_count,
    .device_info = fake_device_info,
    .error_name = fake_error_name,
    .error_string = fake_error_string,
};

TEST_IMPL(cuda_fault_injection) {
  const tl__dev_api_t* prev = tl__cuda_set_api(&fake_api);
  ASSERT(prev == &tl__cuda_builtin);
  int n = -1;

  fake_count_rc = TL__CUDA_NO_DEVICE;
  ASSERT_EQ(tl_cuda_device_count(&n), TL_ENODEV);
  ASSERT_EQ(n, 0);

  fake_count_rc = TL__CUDA_INSUFFICIENT_DRIVER;
  ASSERT_EQ(tl_cuda_device_count(&n), TL_ENODRIVER);

  fake_count_rc = 999;
  ASSERT_EQ(tl_cuda_device_count(&n), TL_ECUDA);
  ASSERT_CONTAINS(tl_err_detail(), "cudaGetDeviceCount: cudaErrorFake (999): fake failure");

  fake_count_rc = 0;
  fake_count = 0; /* success with zero devices is still "no device" */
  ASSERT_EQ(tl_cuda_device_count(&n), TL_ENODEV);

  fake_count = 2;
  ASSERT_OK(tl_cuda_device_count(&n));
  ASSERT_EQ(n, 2);
  ASSERT_EQ(tl_err_detail()[0], '\0');
  tl_gpu_info_t info;
  ASSERT_OK(tl_cuda_device_info(0, &info));
  ASSERT_STR_EQ(info.name, "Fake GPU 0");
  /* a sticky error: the device is unusable until the process restarts */
  ASSERT_EQ(tl_cuda_device_info(1, &info), TL_EDEVLOST);
  ASSERT_CONTAINS(tl_err_detail(), "cudaErrorIllegalAddress");
  ASSERT_EQ(tl_cuda_device_info(2, &info), TL_ENODEV);
  ASSERT_CONTAINS(tl_err_detail(), "2 GPU(s) are visible");
  ASSERT_EQ(tl_cuda_device_info(-1, &info), TL_ENODEV);
  ASSERT_EQ(tl_cuda_device_info(0, NULL), TL_EINVAL);

  int drv = -1;
  ASSERT_OK(tl_cuda_driver_version(&drv));
  ASSERT_EQ(drv, 13000);

  ASSERT(tl__cuda_set_api(NULL) == &fake_api);
  ASSERT(tl__cuda_api() == &tl__cuda_builtin);
  return 0;
}

TEST_IMPL(gpu_cuda_devices) {
  int n = 0;
  int err = tl_cuda_device_count(&n);
  if (err != 0) SKIP("no GPU: %s (%s)", tl_strerror(err), tl_err_detail());
  ASSERT(n >= 1);
  tl_topo_t* t = NULL;
  ASSERT_OK(tl_topo_init(&t, NULL));
  tl_topo_summary_t s;
  ASSERT_OK(tl_topo_summary(t, &s));
  for (int i = 0; i < n; i++) {
    tl_gpu_info_t g;
    ASSERT_OK(tl_cuda_device_info(i, &g));
    ASSERT_EQ(g.index, i);
    ASSERT(g.name[0] != '\0');
    ASSERT(g.total_mem > ((size_t)1 << 30));
    ASSERT(g.cc_major >= 5);
    ASSERT(g.sm_count >= 1);
    ASSERT_EQ(strlen(g.pci_bus_id), 12);
    /* every CUDA device is an NVIDIA PCI device of the topology */
    int found = 0;
    for (int j = 0; j < s.gpus; j++) {
      tl_topo_gpu_t tg;
      ASSERT_OK(tl_topo_gpu(t, j, &tg));
      if (strcmp(tg.pci_bus_id, g.pci_bus_id) == 0) found = 1;
    }
    if (!found) TL_FAIL_AT("CUDA device %d (%s) is not in the hwloc topology", i, g.pci_bus_id);
  }
  tl_topo_close(t);
  return 0;
}

TEST_IMPL(nccl_version) {
  int v = -1;
  int err = tl_nccl_version(&v);
  if (err == TL_ENOLIB) {
    ASSERT_EQ(v, 0);
    ASSERT_CONTAINS(tl_err_detail(), "NCCL: ");
    SKIP("libnccl.so.2 is not loadable here: %s", tl_err_detail());
  }
  ASSERT_OK(err);
  ASSERT(v >= 21000); /* 2.10 or newer */
  return 0;
}

// ---------------------------------------------------------------------------------------------
// NCCL: unique ids (no GPU needed), communicators through a fake table, one real rank on a GPU
// ---------------------------------------------------------------------------------------------

TEST_IMPL(nccl_unique_id) {
  tl_nccl_id_t a, b;
  int err = tl_nccl_unique_id(&a);
  if (err == TL_ENOLIB) SKIP("libnccl.so.2 is not loadable here: %s", tl_err_detail());
  ASSERT_OK(err);
  ASSERT_OK(tl_nccl_unique_id(&b));
  ASSERT(memcmp(a.bytes, b.bytes, sizeof a.bytes) != 0); /* a fresh id (its nonce) each time */
  int nonzero = 0;
  for (size_t i = 0; i < sizeof a.bytes; i++) nonzero |= a.bytes[i];
  ASSERT(nonzero);
  ASSERT_EQ(tl_nccl_unique_id(NULL), TL_EINVAL);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// A fake NCCL: records every call and its arguments, answers what the test sets
// ---------------------------------------------------------------------------------------------

enum { IN_PROGRESS = 7 }; /* ncclInProgress */

static struct {
  int rc;                 /* what the next id/version/init/collective call returns */
  int init_blocking;      /* the blocking field init was given */
  int polls_left;         /* ncclCommGetAsyncError answers ncclInProgress this many more times */
  int async_state;        /* then this state (0: ready) */
  _Atomic int polls, aborts, destroys, group_starts, group_ends, colls;
  int freed;              /* 1 once ncclCommAbort ran on the object: later use is a bug */
  _Atomic int used_after_free;
  /* the last collective */
  const char* kind;
  const void* send;
  void* recv;
  size_t count;
  int dtype, arg;
  void* comm;
  void* stream;
} fk;
static int fake_nccl_comm_object;          /* the "ncclComm_t" the fake hands out */
static int fake_set_device_rc, fake_device = -1;

static void fake_reset(void) {
  memset(&fk, 0, sizeof fk);
}
static int fake_nccl_version(int* v) {
  *v = 22805;
  return fk.rc;
}
static int fake_nccl_unique_id(tl__nccl_id_t* id) {
  memset(id->internal, 0x5a, sizeof id->internal);
  return fk.rc;
}
static int fake_nccl_init(void** comm, int nranks, tl__nccl_id_t id, int rank, int blocking) {
  (void)nranks;
  (void)rank;
  if (id.internal[0] != 0x5a) return 4; /* ncclInvalidArgument: the id did not come through */
  fk.init_blocking = blocking;
  fk.freed = 0;
  *comm = fk.rc && fk.rc != IN_PROGRESS ? NULL : &fake_nccl_comm_object;
  return fk.rc;
}
static int fake_nccl_async_error(void* comm, int* state) {
  if (comm != &fake_nccl_comm_object || fk.freed) fk.used_after_free++;
  fk.polls++;
  *state = fk.polls_left > 0 ? (fk.polls_left--, IN_PROGRESS) : fk.async_state;
  return 0;
}
static int fake_nccl_abort(void* comm) {
  if (fk.freed) fk.used_after_free++;
  fk.aborts += comm == &fake_nccl_comm_object;
  fk.freed = 1;
  return 0;
}
static int fake_nccl_destroy(void* comm) {
  if (fk.freed) fk.used_after_free++;
  fk.destroys += comm == &fake_nccl_comm_object;
  fk.freed = 1;
  return 0;
}
static int fake_record(const char* kind, const void* send, void* recv, size_t count, int dtype,
                       int arg, void* comm, void* stream) {
  if (comm != &fake_nccl_comm_object || fk.freed) fk.used_after_free++;
  fk.colls++;
  fk.kind = kind;
  fk.send = send;
  fk.recv = recv;
  fk.count = count;
  fk.dtype = dtype;
  fk.arg = arg;
  fk.comm = comm;
  fk.stream = stream;
  return fk.rc;
}
static int fake_all_reduce(const void* s, void* r, size_t n, int t, int op, void* c, void* st) {
  return fake_record("allreduce", s, r, n, t, op, c, st);
}
static int fake_broadcast(const void* s, void* r, size_t n, int t, int root, void* c, void* st) {
  return fake_record("broadcast", s, r, n, t, root, c, st);
}
static int fake_all_gather(const void* s, void* r, size_t n, int t, void* c, void* st) {
  return fake_record("allgather", s, r, n, t, -1, c, st);
}
static int fake_reduce_scatter(const void* s, void* r, size_t n, int t, int op, void* c,
                               void* st) {
  return fake_record("reduce_scatter", s, r, n, t, op, c, st);
}
static int fake_group_start(void) {
  fk.group_starts++;
  return 0;
}
static int fake_group_end(void) {
  fk.group_ends++;
  return IN_PROGRESS; /* a non-blocking group end */
}
static const char* fake_nccl_error_string(int code) {
  return code == 2 ? "unhandled system error" : code == 6 ? "remote process exited or there was "
         "a network error" : "fake NCCL failure";
}
static const char* fake_last_error(void* comm) {
  (void)comm;
  return "fake: peer 3 went away";
}
static const char* fake_nccl_why(void) { return "fake: libnccl.so.2 absent"; }
static int fake_set_device(int dev) {
  fake_device = dev;
  return fake_set_device_rc;
}

static const tl__nccl_api_t fake_nccl = {
    .name = "fake",
    .get_version = fake_nccl_version,
    .get_unique_id = fake_nccl_unique_id,
    .comm_init_rank_config = fake_nccl_init,
    .comm_get_async_error = fake_nccl_async_error,
    .comm_abort = fake_nccl_abort,
    .comm_destroy = fake_nccl_destroy,
    .all_reduce = fake_all_reduce,
    .broadcast = fake_broadcast,
    .all_gather = fake_all_gather,
    .reduce_scatter = fake_reduce_scatter,
    .group_start = fake_group_start,
    .group_end = fake_group_end,
    .error_string = fake_nccl_error_string,
    .last_error = fake_last_error,
    .why = fake_nccl_why,
};

static const tl__dev_api_t fake_cuda_with_devices = {
    .name = "fake",
    .runtime_version = fake_version,
    .driver_version = fake_version,
    .device_count = fake_device_count,
    .device_info = fake_device_info,
    .error_name = fake_error_name,
    .error_string = fake_error_string,
    .set_device = fake_set_device,
};

static void fake_install(void) {
  fake_reset();
  ASSERT(tl__nccl_set_api(&fake_nccl) == &tl__nccl_builtin);
  ASSERT(tl__cuda_set_api(&fake_cuda_with_devices) == &tl__cuda_builtin);
}

static void fake_uninstall(void) {
  ASSERT_EQ(fk.used_after_free, 0);
  ASSERT(tl__nccl_set_api(NULL) == &fake_nccl);
  ASSERT(tl__cuda_set_api(NULL) == &fake_cuda_with_devices);
}

/* A live communicator of rank `rank` in a world of `nranks` on the fake. */
static tl_nccl_comm_t* fake_comm(int nranks, int rank, int timeout_ms) {
  tl_nccl_id_t id;
  memset(id.bytes, 0x5a, sizeof id.bytes);
  tl_nccl_comm_t* c = NULL;
  ASSERT_OK(tl_nccl_comm_init(&c, &id, nranks, rank, 0, timeout_ms));
  return c;
}

TEST_IMPL(nccl_fault_injection) {
  fake_install();
  tl_nccl_id_t id;
  tl_nccl_comm_t* c = NULL;

  /* a failing ncclGetUniqueId / ncclGetVersion keeps its code and NCCL's text */
  fk.rc = 2;
  ASSERT_EQ(tl_nccl_unique_id(&id), TL_ENCCL);
  ASSERT_CONTAINS(tl_err_detail(), "ncclGetUniqueId returned ncclResult_t 2: unhandled system error");
  int v;
  ASSERT_EQ(tl_nccl_version(&v), TL_ENCCL);
  /* the library missing is TL_ENOLIB with the loader's reason */
  fk.rc = TL__NCCL_NOT_LOADED;
  ASSERT_EQ(tl_nccl_unique_id(&id), TL_ENOLIB);
  ASSERT_CONTAINS(tl_err_detail(), "NCCL: fake: libnccl.so.2 absent");

  fk.rc = 0;
  ASSERT_OK(tl_nccl_unique_id(&id));
  ASSERT_EQ(id.bytes[127], 0x5a);

  /* bad arguments never reach NCCL */
  ASSERT_EQ(tl_nccl_comm_init(&c, &id, 2, 2, 0, -1), TL_EINVAL);
  ASSERT_EQ(tl_nccl_comm_init(&c, &id, 0, 0, 0, -1), TL_EINVAL);
  ASSERT_EQ(tl_nccl_comm_init(&c, &id, 1, 0, -1, -1), TL_EINVAL);
  ASSERT_EQ(tl_nccl_comm_init(NULL, &id, 1, 0, 0, -1), TL_EINVAL);
  ASSERT(c == NULL);

  /* cudaSetDevice failing stops before NCCL, translated as CUDA errors are */
  fake_set_device_rc = TL__CUDA_INVALID_DEVICE;
  ASSERT_EQ(tl_nccl_comm_init(&c, &id, 1, 0, 3, -1), TL_ENODEV);
  ASSERT_CONTAINS(tl_err_detail(), "cudaSetDevice");
  ASSERT_EQ(fake_device, 3);
  fake_set_device_rc = 0;

  /* ncclCommInitRankConfig failing: no communicator, NCCL's code in the detail */
  fk.rc = 6;
  ASSERT_EQ(tl_nccl_comm_init(&c, &id, 4, 1, 0, -1), TL_ENCCL);
  ASSERT_CONTAINS(tl_err_detail(), "ncclCommInitRankConfig returned ncclResult_t 6");
  ASSERT(c == NULL);

  /* non-blocking init: in progress for 3 polls, then ready */
  fk.rc = IN_PROGRESS;
  fk.polls_left = 3;
  fk.init_blocking = -1;
  ASSERT_OK(tl_nccl_comm_init(&c, &id, 4, 1, 1, 10000));
  ASSERT_EQ(fk.init_blocking, 0);
  ASSERT_EQ(fk.polls, 4);
  ASSERT_EQ(fake_device, 1);
  fk.rc = 0;

  /* abort twice: one ncclCommAbort; close after abort: no ncclCommDestroy */
  ASSERT_EQ(tl_nccl_comm_aborted(c), 0);
  ASSERT_OK(tl_nccl_comm_check(c));
  ASSERT_OK(tl_nccl_comm_abort(c));
  ASSERT_OK(tl_nccl_comm_abort(c));
  ASSERT_EQ(tl_nccl_comm_aborted(c), 1);
  ASSERT_EQ(fk.aborts, 1);
  ASSERT_EQ(tl_nccl_comm_check(c), TL_ECANCELED);
  ASSERT_OK(tl_nccl_comm_close(c));
  ASSERT_EQ(fk.destroys, 0);

  /* close without abort destroys */
  ASSERT_OK(tl_nccl_comm_init(&c, &id, 1, 0, 0, -1));
  ASSERT_OK(tl_nccl_comm_close(c));
  ASSERT_EQ(fk.destroys, 1);
  ASSERT_EQ(fk.aborts, 1);
  ASSERT_OK(tl_nccl_comm_close(NULL));
  ASSERT_EQ(tl_nccl_comm_abort(NULL), TL_EINVAL);
  ASSERT_EQ(tl_nccl_comm_check(NULL), TL_EINVAL);

  fake_uninstall();
  return 0;
}

TEST_IMPL(nccl_init_timeout_and_async_error_abort) {
  fake_install();
  tl_nccl_id_t id;
  memset(id.bytes, 0x5a, sizeof id.bytes);
  tl_nccl_comm_t* c = NULL;

  /* a rank that never joins: still in progress at the deadline -> aborted, TL_ETIMEDOUT */
  fk.rc = IN_PROGRESS;
  fk.polls_left = 1 << 30;
  ASSERT_EQ(tl_nccl_comm_init(&c, &id, 2, 0, 0, 30), TL_ETIMEDOUT);
  ASSERT_CONTAINS(tl_err_detail(), "ncclCommInitRankConfig: NCCL still in progress after 30 ms");
  ASSERT(c == NULL);
  ASSERT_EQ(fk.aborts, 1);
  ASSERT(fk.polls >= 2);

  /* an asynchronous error while joining: aborted, NCCL's code and last message */
  fk.polls_left = 2;
  fk.async_state = 6;
  ASSERT_EQ(tl_nccl_comm_init(&c, &id, 2, 0, 0, -1), TL_ENCCL);
  ASSERT_CONTAINS(tl_err_detail(), "asynchronous NCCL error, ncclResult_t 6: remote process");
  ASSERT_CONTAINS(tl_err_detail(), "(NCCL: fake: peer 3 went away)");
  ASSERT(c == NULL);
  ASSERT_EQ(fk.aborts, 2);

  /* the watchdog's check finds an asynchronous error on a live communicator and aborts it */
  fk.rc = 0;
  fk.async_state = 0;
  c = fake_comm(2, 1, -1);
  ASSERT_OK(tl_nccl_comm_check(c));
  fk.async_state = 6;
  ASSERT_EQ(tl_nccl_comm_check(c), TL_ENCCL);
  ASSERT_CONTAINS(tl_err_detail(), "ncclCommGetAsyncError returned ncclResult_t 6");
  ASSERT_EQ(tl_nccl_comm_aborted(c), 1);
  ASSERT_EQ(fk.aborts, 3);
  /* and every later call fails cleanly without reaching NCCL */
  int colls = fk.colls;
  float x[4];
  tl_dtype_t f32 = {TL_DTYPE_FLOAT, 32, 1};
  ASSERT_EQ(tl_nccl_allreduce(c, x, x, 4, f32, TL_NCCL_SUM, NULL), TL_ECANCELED);
  ASSERT_CONTAINS(tl_err_detail(), "ncclAllReduce: the NCCL communicator was aborted");
  ASSERT_EQ(fk.colls, colls);
  ASSERT_OK(tl_nccl_comm_close(c));
  ASSERT_EQ(fk.destroys, 0);
  fake_uninstall();
  return 0;
}

TEST_IMPL(nccl_collectives_arguments) {
  fake_install();
  tl_nccl_comm_t* c = fake_comm(4, 2, 10000);
  char a[64], b[256];
  void* stream = (void*)(uintptr_t)0x5eed;

  /* every DLPack dtype NCCL has, mapped to its ncclDataType_t */
  static const struct { uint8_t code, bits; int nccl; size_t size; } types[] = {
      {TL_DTYPE_INT, 8, 0, 1},     {TL_DTYPE_UINT, 8, 1, 1},   {TL_DTYPE_INT, 32, 2, 4},
      {TL_DTYPE_UINT, 32, 3, 4},   {TL_DTYPE_INT, 64, 4, 8},   {TL_DTYPE_UINT, 64, 5, 8},
      {TL_DTYPE_FLOAT, 16, 6, 2},  {TL_DTYPE_FLOAT, 32, 7, 4}, {TL_DTYPE_FLOAT, 64, 8, 8},
      {TL_DTYPE_BFLOAT, 16, 9, 2}};
  for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
    tl_dtype_t t = {types[i].code, types[i].bits, 1};
    size_t size = 0;
    ASSERT_OK(tl_nccl_dtype_size(t, &size));
    ASSERT_EQ(size, types[i].size);
    ASSERT_OK(tl_nccl_allreduce(c, a, b, 3, t, TL_NCCL_MAX, stream));
    ASSERT_STR_EQ(fk.kind, "allreduce");
    ASSERT_EQ(fk.dtype, types[i].nccl);
    ASSERT(fk.send == a && fk.recv == b && fk.stream == stream);
    ASSERT(fk.comm == &fake_nccl_comm_object);
    ASSERT_EQ(fk.count, 3);
    ASSERT_EQ(fk.arg, 2); /* ncclMax */
  }
  /* ops map to ncclRedOp_t; avg on floats only */
  tl_dtype_t f32 = {TL_DTYPE_FLOAT, 32, 1}, i32 = {TL_DTYPE_INT, 32, 1};
  for (int op = TL_NCCL_SUM; op <= TL_NCCL_AVG; op++) {
    ASSERT_OK(tl_nccl_allreduce(c, a, a, 16, f32, (tl_nccl_op_t)op, NULL));
    ASSERT_EQ(fk.arg, op);
    ASSERT(fk.stream == NULL && fk.send == a && fk.recv == a);
  }
  int colls = fk.colls;
  ASSERT_EQ(tl_nccl_allreduce(c, a, a, 16, i32, TL_NCCL_AVG, NULL), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "avg on an integer dtype");
  ASSERT_EQ(tl_nccl_reduce_scatter(c, a, a, 4, i32, TL_NCCL_AVG, NULL), TL_EINVAL);
  ASSERT_EQ(tl_nccl_allreduce(c, a, a, 16, f32, (tl_nccl_op_t)5, NULL), TL_EINVAL);
  /* types NCCL lacks, vectors */
  tl_dtype_t bad[] = {{TL_DTYPE_INT, 16, 1}, {6 /* bool */, 8, 1}, {TL_DTYPE_FLOAT, 32, 2},
                      {5 /* complex */, 64, 1}, {TL_DTYPE_BFLOAT, 32, 1}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    ASSERT_EQ(tl_nccl_allreduce(c, a, a, 1, bad[i], TL_NCCL_SUM, NULL), TL_EINVAL);
    ASSERT_CONTAINS(tl_err_detail(), "has no NCCL type");
  }
  /* NULL buffers (count 0 is fine), sizes that overflow */
  ASSERT_EQ(tl_nccl_allreduce(c, NULL, a, 1, f32, TL_NCCL_SUM, NULL), TL_EINVAL);
  ASSERT_EQ(tl_nccl_allreduce(c, a, NULL, 1, f32, TL_NCCL_SUM, NULL), TL_EINVAL);
  ASSERT_EQ(tl_nccl_allreduce(NULL, a, a, 1, f32, TL_NCCL_SUM, NULL), TL_EINVAL);
  ASSERT_EQ(tl_nccl_allreduce(c, a, a, SIZE_MAX / 2, f32, TL_NCCL_SUM, NULL), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "overflow");
  ASSERT_EQ(tl_nccl_allgather(c, a, b, SIZE_MAX / 8, f32, NULL), TL_EINVAL); /* x 4 ranks */
  ASSERT_EQ(tl_nccl_reduce_scatter(c, a, b, SIZE_MAX / 8, f32, TL_NCCL_SUM, NULL), TL_EINVAL);
  ASSERT_EQ(fk.colls, colls);
  ASSERT_OK(tl_nccl_allreduce(c, NULL, NULL, 0, f32, TL_NCCL_SUM, NULL));
  ASSERT_EQ(fk.count, 0);

  /* broadcast: root checked; send may be NULL where this rank (2) is not the root */
  ASSERT_EQ(tl_nccl_broadcast(c, a, b, 8, f32, 4, NULL), TL_EINVAL);
  ASSERT_EQ(tl_nccl_broadcast(c, a, b, 8, f32, -1, NULL), TL_EINVAL);
  ASSERT_EQ(tl_nccl_broadcast(c, NULL, b, 8, f32, 2, NULL), TL_EINVAL);
  ASSERT_OK(tl_nccl_broadcast(c, NULL, b, 8, f32, 3, stream));
  ASSERT_STR_EQ(fk.kind, "broadcast");
  ASSERT(fk.send == NULL && fk.recv == b && fk.stream == stream);
  ASSERT_EQ(fk.arg, 3);
  ASSERT_EQ(fk.count, 8);
  /* allgather passes the per-rank count, reduce-scatter the per-rank result count */
  ASSERT_OK(tl_nccl_allgather(c, a, b, 5, (tl_dtype_t){TL_DTYPE_BFLOAT, 16, 1}, stream));
  ASSERT_STR_EQ(fk.kind, "allgather");
  ASSERT(fk.send == a && fk.recv == b);
  ASSERT_EQ(fk.count, 5);
  ASSERT_EQ(fk.dtype, 9);
  ASSERT_OK(tl_nccl_reduce_scatter(c, b, a, 6, f32, TL_NCCL_MIN, stream));
  ASSERT_STR_EQ(fk.kind, "reduce_scatter");
  ASSERT(fk.send == b && fk.recv == a);
  ASSERT_EQ(fk.count, 6);
  ASSERT_EQ(fk.arg, 3); /* ncclMin */

  /* a collective answering ncclInProgress is waited for; a synchronous NCCL error is reported
   * with NCCL's last message and leaves the communicator usable */
  int polls = fk.polls;
  fk.rc = IN_PROGRESS;
  fk.polls_left = 2;
  ASSERT_OK(tl_nccl_allreduce(c, a, a, 4, f32, TL_NCCL_SUM, NULL));
  ASSERT_EQ(fk.polls - polls, 3);
  fk.rc = 4;
  ASSERT_EQ(tl_nccl_allreduce(c, a, a, 4, f32, TL_NCCL_SUM, NULL), TL_ENCCL);
  ASSERT_CONTAINS(tl_err_detail(), "ncclAllReduce returned ncclResult_t 4: fake NCCL failure "
                                   "(NCCL: fake: peer 3 went away)");
  ASSERT_EQ(tl_nccl_comm_aborted(c), 0);
  /* an asynchronous error while waiting aborts it */
  fk.rc = IN_PROGRESS;
  fk.polls_left = 1;
  fk.async_state = 6;
  ASSERT_EQ(tl_nccl_broadcast(c, a, a, 4, f32, 0, NULL), TL_ENCCL);
  ASSERT_CONTAINS(tl_err_detail(), "ncclBroadcast: asynchronous NCCL error, ncclResult_t 6");
  ASSERT_EQ(tl_nccl_comm_aborted(c), 1);
  ASSERT_EQ(fk.aborts, 1);
  ASSERT_EQ(tl_nccl_allgather(c, a, b, 1, f32, NULL), TL_ECANCELED);
  ASSERT_OK(tl_nccl_comm_close(c));

  /* a collective stuck in progress past the communicator's timeout is aborted */
  fk.rc = 0;
  fk.async_state = 0;
  c = fake_comm(2, 0, 20);
  fk.rc = IN_PROGRESS;
  fk.polls_left = 1 << 30;
  ASSERT_EQ(tl_nccl_reduce_scatter(c, a, b, 2, f32, TL_NCCL_SUM, NULL), TL_ETIMEDOUT);
  ASSERT_CONTAINS(tl_err_detail(), "ncclReduceScatter: NCCL still in progress after 20 ms");
  ASSERT_EQ(fk.aborts, 2);
  ASSERT_OK(tl_nccl_comm_close(c));
  fake_uninstall();
  return 0;
}

TEST_IMPL(nccl_groups) {
  fake_install();
  tl_nccl_comm_t* c = fake_comm(2, 0, 10000);
  tl_dtype_t f64 = {TL_DTYPE_FLOAT, 64, 1};
  double a[8];

  ASSERT_EQ(tl_nccl_group_end(), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "no group is open");
  ASSERT_EQ(fk.group_ends, 0);

  /* nested groups: NCCL sees every start/end; only the outermost end waits */
  fk.rc = IN_PROGRESS; /* the collectives queue; the polls come at the end */
  fk.polls_left = 0;
  int polls = fk.polls;
  ASSERT_OK(tl_nccl_group_start());
  ASSERT_OK(tl_nccl_allreduce(c, a, a, 4, f64, TL_NCCL_SUM, NULL));
  ASSERT_OK(tl_nccl_group_start());
  ASSERT_OK(tl_nccl_broadcast(c, a, a, 4, f64, 1, NULL));
  ASSERT_OK(tl_nccl_group_end());
  ASSERT_EQ(fk.polls, polls);
  ASSERT_OK(tl_nccl_allgather(c, a, a, 2, f64, NULL));
  ASSERT_EQ(fk.colls, 3);
  ASSERT_EQ(fk.polls, polls);
  ASSERT_OK(tl_nccl_group_end());
  ASSERT_EQ(fk.polls, polls + 1); /* one communicator, waited for once */
  ASSERT_EQ(fk.group_starts, 2);
  ASSERT_EQ(fk.group_ends, 2);
  ASSERT_EQ(tl_nccl_group_end(), TL_EINVAL);

  /* an abort inside an open group is deferred to its end: NCCL still holds the communicator */
  ASSERT_OK(tl_nccl_group_start());
  ASSERT_OK(tl_nccl_allreduce(c, a, a, 4, f64, TL_NCCL_SUM, NULL));
  ASSERT_OK(tl_nccl_comm_abort(c));
  ASSERT_EQ(tl_nccl_comm_aborted(c), 1);
  ASSERT_EQ(fk.aborts, 0);
  ASSERT_EQ(tl_nccl_allreduce(c, a, a, 4, f64, TL_NCCL_SUM, NULL), TL_ECANCELED);
  ASSERT_EQ(tl_nccl_group_end(), TL_ECANCELED);
  ASSERT_EQ(fk.aborts, 1);
  ASSERT_OK(tl_nccl_comm_close(c));

  /* at most TL_NCCL_GROUP_MAX communicators in one group */
  fk.rc = 0;
  tl_nccl_comm_t* many[TL_NCCL_GROUP_MAX + 1];
  for (int i = 0; i <= TL_NCCL_GROUP_MAX; i++) many[i] = fake_comm(2, 1, -1);
  ASSERT_OK(tl_nccl_group_start());
  for (int i = 0; i < TL_NCCL_GROUP_MAX; i++)
    ASSERT_OK(tl_nccl_allreduce(many[i], a, a, 1, f64, TL_NCCL_SUM, NULL));
  ASSERT_EQ(tl_nccl_allreduce(many[TL_NCCL_GROUP_MAX], a, a, 1, f64, TL_NCCL_SUM, NULL),
            TL_EINVAL);
  ASSERT_OK(tl_nccl_group_end());
  for (int i = 0; i <= TL_NCCL_GROUP_MAX; i++) {
    ASSERT_OK(tl_nccl_comm_close(many[i]));
    fk.freed = 0; /* the fake hands every communicator the same object */
  }
  fake_uninstall();
  return 0;
}

/* Abort racing collectives: threads call collectives in a loop while another thread aborts;
 * the fake counts any NCCL call that reaches the communicator after ncclCommAbort freed it.
 * Seeded (the abort comes after a chosen number of collectives); under TSan any unprotected
 * access to the communicator shows as a race. */
enum { RACE_THREADS = 3 };
static tl_nccl_comm_t* race_comm;
static pthread_barrier_t race_barrier;
static _Atomic int race_canceled;

static void* race_worker(void* arg) {
  (void)arg;
  tl_dtype_t f32 = {TL_DTYPE_FLOAT, 32, 1};
  float x[4] = {0};
  pthread_barrier_wait(&race_barrier);
  for (;;) {
    int err = tl_nccl_allreduce(race_comm, x, x, 4, f32, TL_NCCL_SUM, NULL);
    if (err == TL_ECANCELED) break;
    ASSERT_OK(err);
    ASSERT_OK(tl_nccl_group_start());
    err = tl_nccl_broadcast(race_comm, x, x, 4, f32, 0, NULL);
    int end = tl_nccl_group_end();
    if (err == TL_ECANCELED || end == TL_ECANCELED) break;
    ASSERT_OK(err);
    ASSERT_OK(end);
  }
  race_canceled++;
  return NULL;
}

TEST_IMPL(nccl_abort_races_collectives) {
  fake_install();
  for (int round = 0; round < 20; round++) {
    fk.rc = round % 2 ? IN_PROGRESS : 0; /* also while a wait polls */
    fk.polls_left = 0;
    race_comm = fake_comm(2, 0, -1);
    race_canceled = 0;
    int target = fk.colls + 1 + (round * 7919) % 50;
    pthread_barrier_init(&race_barrier, NULL, RACE_THREADS + 1);
    pthread_t t[RACE_THREADS];
    for (int i = 0; i < RACE_THREADS; i++) ASSERT_EQ(pthread_create(&t[i], NULL, race_worker, NULL), 0);
    pthread_barrier_wait(&race_barrier);
    while (fk.colls < target) sched_yield();
    ASSERT_OK(tl_nccl_comm_abort(race_comm));
    for (int i = 0; i < RACE_THREADS; i++) ASSERT_EQ(pthread_join(t[i], NULL), 0);
    ASSERT_EQ(race_canceled, RACE_THREADS);
    ASSERT_EQ(fk.aborts, round + 1);
    ASSERT_OK(tl_nccl_comm_close(race_comm));
    pthread_barrier_destroy(&race_barrier);
  }
  fake_uninstall();
  return 0;
}

TEST_IMPL(gpu_nccl_comm_one_rank) {
  int n = 0;
  int err = tl_cuda_device_count(&n);
  if (err != 0) SKIP("no GPU: %s (%s)", tl_strerror(err), tl_err_detail());
  tl_nccl_id_t id;
  err = tl_nccl_unique_id(&id);
  if (err == TL_ENOLIB) SKIP("libnccl.so.2 is not loadable here: %s", tl_err_detail());
  ASSERT_OK(err);
  tl_nccl_comm_t* c = NULL;
  ASSERT_OK(tl_nccl_comm_init(&c, &id, 1, 0, 0, 60000));
  ASSERT_OK(tl_nccl_comm_close(c));
  /* a second one, aborted instead of destroyed */
  ASSERT_OK(tl_nccl_unique_id(&id));
  ASSERT_OK(tl_nccl_comm_init(&c, &id, 1, 0, n - 1, 60000));
  ASSERT_OK(tl_nccl_comm_abort(c));
  ASSERT_EQ(tl_nccl_comm_aborted(c), 1);
  ASSERT_OK(tl_nccl_comm_close(c));
  return 0;
}
