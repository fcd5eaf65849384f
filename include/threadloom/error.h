/* threadloom/error.h: the error table.
 *
 * Every fallible call returns 0 or a negative TL_E* code. The codes, their names, their one-line
 * messages and a sentence saying what a user can do about them all come from the single X-macro
 * list TL_ERRNO_MAP below (the way libuv's UV_ERRNO_MAP works): add a row there and the enum,
 * tl_strerror(), tl_err_name(), tl_err_hint() and the Python exceptions all follow.
 *
 * Failures of errno-setting calls, hwloc, CUDA and NCCL are translated where they happen; the
 * original code (e.g. "cudaErrorInsufficientDriver") is kept in the per-thread detail text that
 * tl_err_detail() returns, so error messages can still name it. */
#ifndef THREADLOOM_ERROR_H
#define THREADLOOM_ERROR_H

#include "threadloom/common.h"

TL_BEGIN_DECLS

/* XX(name, value, message, hint). Values are negative and stable: never renumber a row. */
#define TL_ERRNO_MAP(XX)                                                                          \
  XX(EINVAL, -1, "invalid argument",                                                              \
     "check the arguments against the documentation of the call")                                 \
  XX(ENOMEM, -2, "out of memory",                                                                 \
     "lower the memory budget (batch size, staging or prefetch sizes) or free memory")            \
  XX(EBUSY, -3, "resource busy",                                                                  \
     "close the objects that still depend on this one first")                                     \
  XX(ETIMEDOUT, -4, "operation timed out",                                                        \
     "raise the timeout, or find out why the other side stopped making progress")                 \
  XX(ECANCELED, -5, "operation canceled", "the work was canceled before it finished; resubmit it if it is still wanted") \
  XX(ECLOSED, -6, "object is closed or shutting down",                                            \
     "do not use an object after close() or shutdown(); create a new one")                        \
  XX(ENOSYS, -7, "feature not built into this threadloom",                                        \
     "rebuild threadloom with the feature enabled (see `cmake -LH` for the TL_WITH_* options)")   \
  XX(ENODRIVER, -8, "no usable NVIDIA driver",                                                    \
     "install the NVIDIA driver matching the CUDA runtime, or run on a machine with a GPU; "      \
     "CPU paths keep working without one")                                                        \
  XX(ENODEV, -9, "no such device",                                                                \
     "ask for a GPU index below the number of visible GPUs (check CUDA_VISIBLE_DEVICES)")         \
  XX(ECUDA, -10, "CUDA call failed",                                                              \
     "read the CUDA error named in the message; a sticky error means the process must restart")   \
  XX(ENCCL, -11, "NCCL call failed",                                                              \
     "read the NCCL error named in the message; set NCCL_DEBUG=WARN for NCCL's own report")       \
  XX(ETOPOLOGY, -12, "hardware topology could not be read",                                       \
     "check that /sys is mounted, or give a topology file with HWLOC_XMLFILE")                    \
  XX(ENOENT, -13, "no such file or directory", "check the path")                                  \
  XX(EACCES, -14, "permission denied",                                                            \
     "check the permissions of the path, or run as a user who may write it")                      \
  XX(ENOSPC, -15, "no space left on device",                                                      \
     "free space on the target filesystem or point the output somewhere larger")                  \
  XX(EROFS, -16, "read-only file system", "write to a filesystem that is mounted read-write")     \
  XX(EIO, -17, "input/output error", "check the device and the kernel log (dmesg)")              \
  XX(EPERM, -18, "operation not permitted",                                                       \
     "the process lacks the privilege (cgroup, ulimit or capability) for this call")              \
  XX(EAGAIN, -19, "resource temporarily unavailable", "try again later")                          \
  XX(ERANGE, -20, "result out of range", "use a larger buffer or a smaller value")                \
  XX(ENOLIB, -21, "optional library not found",                                                   \
     "install the library named in the message or add its directory to LD_LIBRARY_PATH")         \
  XX(EUNKNOWN, -22, "unknown error", "report this as a threadloom bug with the message text") \
  XX(EDEVLOST, -23, "device lost or in a sticky error state",                                    \
     "the device failed (a sticky CUDA error such as an illegal address or an ECC fault, or it "   \
     "fell off the bus; on sim devices, fault injection or an access outside a live allocation): " \
     "its queued work is lost and the process must restart to use it again")

typedef enum {
#define TL__ERR_ENUM(name, value, msg, hint) TL_##name = (value),
  TL_ERRNO_MAP(TL__ERR_ENUM)
#undef TL__ERR_ENUM
  TL_ERRNO_MAX = -24 /* one past the last code; not an error */
} tl_errno_t;

/* "invalid argument" for TL_EINVAL; "unknown error code N" style text is never returned:
 * codes outside the table give "unknown error". Static storage. */
TL_EXTERN const char* tl_strerror(int err);
/* "TL_EINVAL" for TL_EINVAL; "TL_EUNKNOWN" for codes outside the table. Static storage. */
TL_EXTERN const char* tl_err_name(int err);
/* One sentence saying what a user can do. Static storage. */
TL_EXTERN const char* tl_err_hint(int err);
/* Translates an errno value (positive) into a TL_E* code; unknown errno gives TL_EIO. */
TL_EXTERN int tl_translate_sys_error(int sys_errno);
/* Text describing the last failure on the calling thread (the CUDA error name, the file path,
 * ...), or "" if the last failing call left none. Owned by the library, per thread, valid until
 * the next threadloom call on this thread. */
TL_EXTERN const char* tl_err_detail(void);

TL_END_DECLS

#endif /* THREADLOOM_ERROR_H */
