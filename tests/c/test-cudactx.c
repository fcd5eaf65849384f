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
