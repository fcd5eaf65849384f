/* core/error.c: the error table's functions and the per-thread failure detail.
 *
 * The table lives in include/threadloom/error.h (TL_ERRNO_MAP); everything here is generated
 * from it with switch statements, so a code can never have a name without a message or hint.
 * The detail text is thread-local: concurrent failures on different threads never mix their
 * messages, and no lock is needed. */
#include "core/internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

const char* tl_strerror(int err) {
  switch (err) {
#define TL__CASE(name, value, msg, hint) case TL_##name: return msg;
    TL_ERRNO_MAP(TL__CASE)
#undef TL__CASE
    default: return "unknown error";
  }
}

const char* tl_err_name(int err) {
  switch (err) {
#define TL__CASE(name, value, msg, hint) case TL_##name: return "TL_" #name;
    TL_ERRNO_MAP(TL__CASE)
#undef TL__CASE
    default: return "TL_EUNKNOWN";
  }
}

const char* tl_err_hint(int err) {
  switch (err) {
#define TL__CASE(name, value, msg, hint) case TL_##name: return hint;
    TL_ERRNO_MAP(TL__CASE)
#undef TL__CASE
    default: return "report this as a threadloom bug with the message text";
  }
}

int tl_translate_sys_error(int sys_errno) {
  switch (sys_errno) {
    case 0: return 0;
    case EINVAL: return TL_EINVAL;
    case ENOMEM: return TL_ENOMEM;
    case EBUSY: return TL_EBUSY;
    case ETIMEDOUT: return TL_ETIMEDOUT;
    case ECANCELED: return TL_ECANCELED;
    case ENOSYS: return TL_ENOSYS;
    case ENODEV: return TL_ENODEV;
    case ENOENT: return TL_ENOENT;
    case EACCES: return TL_EACCES;
    case ENOSPC: return TL_ENOSPC;
    case EDQUOT: return TL_ENOSPC;
    case EROFS: return TL_EROFS;
    case EPERM: return TL_EPERM;
    case EAGAIN: return TL_EAGAIN;
    case ERANGE: return TL_ERANGE;
    default: return TL_EIO;
  }
}

// ---------------------------------------------------------------------------------------------
// Per-thread detail
// ---------------------------------------------------------------------------------------------

_Thread_local char tl__detail[512]; /* declared in core/internal.h */

const char* tl_err_detail(void) { return tl__detail; }

void tl__clear_detail(void) { tl__detail[0] = '\0'; }

int tl__fail(int err, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(tl__detail, sizeof tl__detail, fmt, ap);
  va_end(ap);
  return err;
}

char* tl__strlcpy(char* dst, const char* src, size_t cap) {
  if (cap == 0) return dst;
  size_t n = strlen(src);
  if (n >= cap) n = cap - 1;
  memcpy(dst, src, n);
  dst[n] = '\0';
  return dst;
}
