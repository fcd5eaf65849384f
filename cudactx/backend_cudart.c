/* cudactx/backend_cudart.c: the backend table over the real CUDA runtime (TL_WITH_CUDA=ON).
 *
 * Only runtime API calls that work without a driver are made before a driver is known to be
 * present: cudaRuntimeGetVersion and cudaDriverGetVersion never need one, cudaGetDeviceCount
 * reports cudaErrorInsufficientDriver when libcuda.so.1 is absent. */
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <string.h>

#include "cudactx/internal.h"

static int tl__rt_runtime_version(int* v) { return (int)cudaRuntimeGetVersion(v); }
static int tl__rt_driver_version(int* v) { return (int)cudaDriverGetVersion(v); }
static int tl__rt_device_count(int* n) { return (int)cudaGetDeviceCount(n); }

static int tl__rt_device_info(int dev, tl_gpu_info_t* out) {
  struct cudaDeviceProp p;
  cudaError_t e = cudaGetDeviceProperties(&p, dev);
  if (e != cudaSuccess) return (int)e;
  memset(out, 0, sizeof *out);
  out->index = dev;
  tl__strlcpy(out->name, p.name, sizeof out->name);
  snprintf(out->pci_bus_id, sizeof out->pci_bus_id, "%04x:%02x:%02x.0", (unsigned)p.pciDomainID,
           (unsigned)p.pciBusID, (unsigned)p.pciDeviceID);
  out->total_mem = p.totalGlobalMem;
  out->cc_major = p.major;
  out->cc_minor = p.minor;
  out->sm_count = p.multiProcessorCount;
  return 0;
}

static int tl__rt_host_register(void* p, size_t size) {
  return (int)cudaHostRegister(p, size, cudaHostRegisterDefault);
}
static int tl__rt_host_unregister(void* p) { return (int)cudaHostUnregister(p); }
static int tl__rt_set_device(int dev) { return (int)cudaSetDevice(dev); }

static const char* tl__rt_error_name(int code) { return cudaGetErrorName((cudaError_t)code); }
static const char* tl__rt_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

const tl__cuda_api_t tl__cuda_builtin = {
    .name = "cudart",
    .runtime_version = tl__rt_runtime_version,
    .driver_version = tl__rt_driver_version,
    .device_count = tl__rt_device_count,
    .device_info = tl__rt_device_info,
    .error_name = tl__rt_error_name,
    .error_string = tl__rt_error_string,
    .host_register = tl__rt_host_register,
    .host_unregister = tl__rt_host_unregister,
    .set_device = tl__rt_set_device,
};
