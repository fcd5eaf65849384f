/* cudactx/nccl.c: NCCL, loaded on first use.
 *
 * libthreadloom does not link NCCL: it is large, optional, and absent on many machines that
 * still run threadloom's CPU paths. The library is opened once (pthread_once) with RTLD_LOCAL
 * and kept open for the life of the process. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

#include "cudactx/internal.h"

typedef int (*tl__nccl_get_version_fn)(int*);

static pthread_once_t tl__nccl_once = PTHREAD_ONCE_INIT;
static void* tl__nccl_handle;                       /* written once under tl__nccl_once */
static tl__nccl_get_version_fn tl__nccl_get_version; /* likewise */
static char tl__nccl_dlerror[256];                  /* likewise: why loading failed */

static void tl__nccl_load(void) {
  tl__nccl_handle = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
  if (!tl__nccl_handle) {
    const char* e = dlerror();
    tl__strlcpy(tl__nccl_dlerror, e ? e : "dlopen failed", sizeof tl__nccl_dlerror);
    return;
  }
  *(void**)&tl__nccl_get_version = dlsym(tl__nccl_handle, "ncclGetVersion");
  if (!tl__nccl_get_version)
    tl__strlcpy(tl__nccl_dlerror, "libnccl.so.2 has no ncclGetVersion", sizeof tl__nccl_dlerror);
}

int tl_nccl_version(int* version) {
  tl__clear_detail();
  if (!version) return tl__fail(TL_EINVAL, "tl_nccl_version: NULL argument");
  *version = 0;
  pthread_once(&tl__nccl_once, tl__nccl_load);
  if (!tl__nccl_get_version) return tl__fail(TL_ENOLIB, "NCCL: %s", tl__nccl_dlerror);
  int rc = tl__nccl_get_version(version);
  if (rc != 0) return tl__fail(TL_ENCCL, "ncclGetVersion returned ncclResult_t %d", rc);
  return 0;
}
