/* cudactx/device.c: CUDA discovery and versions over the CUDA table, and the translation of
 * every backend's error codes into TL_E* codes.
 *
 * Invariant: the table pointer is the only shared mutable state; it is an atomic pointer so a
 * test may swap it while no other thread uses CUDA. */
#include <stdatomic.h>
#include <stddef.h>
#include <stdlib.h>

#include "cudactx/internal.h"

static _Atomic(const tl__dev_api_t*) tl__api = NULL;

const tl__dev_api_t* tl__cuda_api(void) {
  const tl__dev_api_t* a = atomic_load_explicit(&tl__api, memory_order_acquire);
  return a ? a : &tl__cuda_builtin;
}

const tl__dev_api_t* tl__cuda_set_api(const tl__dev_api_t* api) {
  const tl__dev_api_t* prev = atomic_exchange_explicit(&tl__api, api, memory_order_acq_rel);
  return prev ? prev : &tl__cuda_builtin;
}

int tl__dev_error(const tl__dev_api_t* api, const char* call, int code) {
  int err;
  switch (code) {
    case TL__CUDA_SUCCESS: return 0;
    case TL__CUDA_NOT_BUILT:
      return tl__fail(TL_ENOSYS, "%s: threadloom was built with TL_WITH_CUDA=OFF", call);
    case TL__CUDA_INSUFFICIENT_DRIVER:
    case TL__CUDA_CALL_REQUIRES_NEWER_DRIVER:
    case TL__CUDA_SYSTEM_DRIVER_MISMATCH: err = TL_ENODRIVER; break;
    case TL__CUDA_NO_DEVICE:
    case TL__CUDA_INVALID_DEVICE:
    case TL__SIM_NOT_CONFIGURED: err = TL_ENODEV; break;
    case TL__CUDA_MEMORY_ALLOCATION: err = TL_ENOMEM; break;
    case TL__CUDA_NOT_READY: err = TL_EAGAIN; break;
    case TL__CUDA_INVALID_VALUE: err = TL_EINVAL; break;
    /* the errors CUDA documents as sticky: the context is unusable until the process restarts */
    case TL__CUDA_ECC_UNCORRECTABLE:
    case TL__CUDA_ILLEGAL_ADDRESS:
    case TL__CUDA_HARDWARE_STACK_ERROR:
    case TL__CUDA_ILLEGAL_INSTRUCTION:
    case TL__CUDA_MISALIGNED_ADDRESS:
    case TL__CUDA_INVALID_ADDRESS_SPACE:
    case TL__CUDA_INVALID_PC:
    case TL__CUDA_LAUNCH_FAILURE:
    case TL__SIM_DEVICE_LOST: err = TL_EDEVLOST; break;
    default: err = TL_ECUDA; break;
  }
  const char* name = api->error_name ? api->error_name(code) : NULL;
  const char* text = api->error_string ? api->error_string(code) : NULL;
  const char* more = api->last_detail ? api->last_detail() : NULL;
  if (more && more[0])
    return tl__fail(err, "%s: %s (%d): %s: %s", call, name ? name : "?", code, text ? text : "",
                    more);
  return tl__fail(err, "%s: %s (%d): %s", call, name ? name : "?", code, text ? text : "");
}

int tl__cuda_error(const char* call, int code) {
  return tl__dev_error(tl__cuda_api(), call, code);
}

int tl_cuda_built(void) { return tl__cuda_builtin.name[0] != 'n'; }

int tl_cuda_runtime_version(int* version) {
  tl__clear_detail();
  if (!version) return tl__fail(TL_EINVAL, "tl_cuda_runtime_version: NULL argument");
  *version = 0;
  return tl__cuda_error("cudaRuntimeGetVersion", tl__cuda_api()->runtime_version(version));
}

int tl_cuda_driver_version(int* version) {
  tl__clear_detail();
  if (!version) return tl__fail(TL_EINVAL, "tl_cuda_driver_version: NULL argument");
  *version = 0;
  int err = tl__cuda_error("cudaDriverGetVersion", tl__cuda_api()->driver_version(version));
  if (err == 0 && *version == 0)
    err = tl__fail(TL_ENODRIVER, "cudaDriverGetVersion: no NVIDIA driver is installed "
                                 "(libcuda.so.1 not found)");
  return err;
}

int tl_cuda_device_count(int* count) {
  tl__clear_detail();
  if (!count) return tl__fail(TL_EINVAL, "tl_cuda_device_count: NULL argument");
  int n = 0;
  int err = tl__cuda_error("cudaGetDeviceCount", tl__cuda_api()->device_count(&n));
  if (err == 0 && n == 0)
    err = tl__fail(TL_ENODEV, "cudaGetDeviceCount: the driver sees no GPU");
  *count = err == 0 ? n : 0;
  return err;
}

int tl_cuda_device_info(int dev, tl_gpu_info_t* out) {
  if (!out) return tl__fail(TL_EINVAL, "tl_cuda_device_info: NULL argument");
  int n;
  int err = tl_cuda_device_count(&n);
  if (err) return err;
  if (dev < 0 || dev >= n)
  {
    const char* cvd = getenv("CUDA_VISIBLE_DEVICES");
    return tl__fail(TL_ENODEV, "GPU %d: %d GPU(s) are visible (CUDA_VISIBLE_DEVICES=%s)", dev, n,
                    cvd ? cvd : "<unset>");
  }
  return tl__cuda_error("cudaGetDeviceProperties", tl__cuda_api()->device_info(dev, out));
}
