/* tests/c/test-cudactx.c: CUDA discovery without a driver (the real runtime on this machine),
 * with faults injected through the backend table, and on a real GPU (skipped without one). */
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

static const tl__cuda_api_t fake_api = {
    .name = "fake",
    .runtime_version = fake_version,
    .driver_version = fake_version,
    .device_count = fake_device_count,
    .device_info = fake_device_info,
    .error_name = fake_error_name,
    .error_string = fake_error_string,
};

TEST_IMPL(cuda_fault_injection) {
  const tl__cuda_api_t* prev = tl__cuda_set_api(&fake_api);
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
  ASSERT_EQ(tl_cuda_device_info(1, &info), TL_ECUDA);
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

static int fake_nccl_rc;                   /* what the next fake call returns */
static int fake_aborts, fake_destroys;     /* calls seen */
static int fake_nccl_comm_object;          /* the "ncclComm_t" the fake hands out */
static int fake_set_device_rc, fake_device = -1;

static int fake_nccl_version(int* v) {
  *v = 22805;
  return fake_nccl_rc;
}
static int fake_nccl_unique_id(tl__nccl_id_t* id) {
  memset(id->internal, 0x5a, sizeof id->internal);
  return fake_nccl_rc;
}
static int fake_nccl_init(void** comm, int nranks, tl__nccl_id_t id, int rank) {
  (void)nranks;
  (void)rank;
  if (id.internal[0] != 0x5a) return 4; /* ncclInvalidArgument: the id did not come through */
  *comm = fake_nccl_rc ? NULL : &fake_nccl_comm_object;
  return fake_nccl_rc;
}
static int fake_nccl_abort(void* comm) {
  fake_aborts += comm == &fake_nccl_comm_object;
  return 0;
}
static int fake_nccl_destroy(void* comm) {
  fake_destroys += comm == &fake_nccl_comm_object;
  return 0;
}
static const char* fake_nccl_error_string(int code) {
  return code == 2 ? "unhandled system error" : "fake NCCL failure";
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
    .comm_init_rank = fake_nccl_init,
    .comm_abort = fake_nccl_abort,
    .comm_destroy = fake_nccl_destroy,
    .error_string = fake_nccl_error_string,
    .why = fake_nccl_why,
};

static const tl__cuda_api_t fake_cuda_with_devices = {
    .name = "fake",
    .runtime_version = fake_version,
    .driver_version = fake_version,
    .device_count = fake_device_count,
    .device_info = fake_device_info,
    .error_name = fake_error_name,
    .error_string = fake_error_string,
    .set_device = fake_set_device,
};

TEST_IMPL(nccl_fault_injection) {
  ASSERT(tl__nccl_set_api(&fake_nccl) == &tl__nccl_builtin);
  ASSERT(tl__cuda_set_api(&fake_cuda_with_devices) == &tl__cuda_builtin);
  tl_nccl_id_t id;
  tl_nccl_comm_t* c = NULL;

  /* a failing ncclGetUniqueId / ncclGetVersion keeps its code and NCCL's text */
  fake_nccl_rc = 2;
  ASSERT_EQ(tl_nccl_unique_id(&id), TL_ENCCL);
  ASSERT_CONTAINS(tl_err_detail(), "ncclGetUniqueId returned ncclResult_t 2: unhandled system error");
  int v;
  ASSERT_EQ(tl_nccl_version(&v), TL_ENCCL);
  /* the library missing is TL_ENOLIB with the loader's reason */
  fake_nccl_rc = TL__NCCL_NOT_LOADED;
  ASSERT_EQ(tl_nccl_unique_id(&id), TL_ENOLIB);
  ASSERT_CONTAINS(tl_err_detail(), "NCCL: fake: libnccl.so.2 absent");

  fake_nccl_rc = 0;
  ASSERT_OK(tl_nccl_unique_id(&id));
  ASSERT_EQ(id.bytes[127], 0x5a);

  /* bad arguments never reach NCCL */
  ASSERT_EQ(tl_nccl_comm_init(&c, &id, 2, 2, 0), TL_EINVAL);
  ASSERT_EQ(tl_nccl_comm_init(&c, &id, 0, 0, 0), TL_EINVAL);
  ASSERT_EQ(tl_nccl_comm_init(&c, &id, 1, 0, -1), TL_EINVAL);
  ASSERT_EQ(tl_nccl_comm_init(NULL, &id, 1, 0, 0), TL_EINVAL);
  ASSERT(c == NULL);

  /* cudaSetDevice failing stops before NCCL, translated as CUDA errors are */
  fake_set_device_rc = TL__CUDA_INVALID_DEVICE;
  ASSERT_EQ(tl_nccl_comm_init(&c, &id, 1, 0, 3), TL_ENODEV);
  ASSERT_CONTAINS(tl_err_detail(), "cudaSetDevice");
  ASSERT_EQ(fake_device, 3);
  fake_set_device_rc = 0;

  /* ncclCommInitRank failing: no communicator, NCCL's code in the detail */
  fake_nccl_rc = 6;
  ASSERT_EQ(tl_nccl_comm_init(&c, &id, 4, 1, 0), TL_ENCCL);
  ASSERT_CONTAINS(tl_err_detail(), "ncclCommInitRank returned ncclResult_t 6");
  ASSERT(c == NULL);

  /* abort twice: one ncclCommAbort; close after abort: no ncclCommDestroy */
  fake_nccl_rc = 0;
  fake_aborts = fake_destroys = 0;
  ASSERT_OK(tl_nccl_comm_init(&c, &id, 4, 1, 1));
  ASSERT_EQ(fake_device, 1);
  ASSERT_EQ(tl_nccl_comm_aborted(c), 0);
  ASSERT_OK(tl_nccl_comm_abort(c));
  ASSERT_OK(tl_nccl_comm_abort(c));
  ASSERT_EQ(tl_nccl_comm_aborted(c), 1);
  ASSERT_EQ(fake_aborts, 1);
  ASSERT_OK(tl_nccl_comm_close(c));
  ASSERT_EQ(fake_destroys, 0);

  /* close without abort destroys */
  ASSERT_OK(tl_nccl_comm_init(&c, &id, 1, 0, 0));
  ASSERT_OK(tl_nccl_comm_close(c));
  ASSERT_EQ(fake_destroys, 1);
  ASSERT_EQ(fake_aborts, 1);
  ASSERT_OK(tl_nccl_comm_close(NULL));
  ASSERT_EQ(tl_nccl_comm_abort(NULL), TL_EINVAL);

  ASSERT(tl__nccl_set_api(NULL) == &fake_nccl);
  ASSERT(tl__cuda_set_api(NULL) == &fake_cuda_with_devices);
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
  ASSERT_OK(tl_nccl_comm_init(&c, &id, 1, 0, 0));
  ASSERT_OK(tl_nccl_comm_close(c));
  /* a second one, aborted instead of destroyed */
  ASSERT_OK(tl_nccl_unique_id(&id));
  ASSERT_OK(tl_nccl_comm_init(&c, &id, 1, 0, n - 1));
  ASSERT_OK(tl_nccl_comm_abort(c));
  ASSERT_EQ(tl_nccl_comm_aborted(c), 1);
  ASSERT_OK(tl_nccl_comm_close(c));
  return 0;
}
