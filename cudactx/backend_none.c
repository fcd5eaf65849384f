/* cudactx/backend_none.c: the CUDA table of a build without CUDA (TL_WITH_CUDA=OFF).
 * Every discovery call answers TL__CUDA_NOT_BUILT, which device.c turns into TL_ENOSYS; with no
 * device count there are no cuda devices, so the device entries (NULL) are never reached. The
 * sim backend works the same in such a build. */
#include "cudactx/internal.h"

static int tl__none_version(int* v) {
  *v = 0;
  return TL__CUDA_NOT_BUILT;
}
static int tl__none_device_info(int dev, tl_gpu_info_t* out) {
  (void)dev;
  (void)out;
  return TL__CUDA_NOT_BUILT;
}
static int tl__none_host_register(void* p, size_t size) {
  (void)p;
  (void)size;
  return TL__CUDA_NOT_BUILT;
}
static int tl__none_host_unregister(void* p) {
  (void)p;
  return TL__CUDA_NOT_BUILT;
}
static int tl__none_set_device(int dev) {
  (void)dev;
  return TL__CUDA_NOT_BUILT;
}
static const char* tl__none_error_name(int code) {
  (void)code;
  return "not built with CUDA";
}

const tl__dev_api_t tl__cuda_builtin = {
    .name = "none",
    .kind = TL_DEVICE_NONE,
    .runtime_version = tl__none_version,
    .driver_version = tl__none_version,
    .device_count = tl__none_version,
    .device_info = tl__none_device_info,
    .error_name = tl__none_error_name,
    .error_string = tl__none_error_name,
    .host_register = tl__none_host_register,
    .host_unregister = tl__none_host_unregister,
    .set_device = tl__none_set_device,
};
