/* threadloom/common.h: macros shared by every public header.
 *
 * Thread-safety default (stated once, here): every public function may be called from any
 * thread at the same time as any other, on distinct objects. Calls on the same object from
 * several threads need the caller's synchronisation unless the function's comment says
 * "thread-safe on one object". Functions that depart from this say so.
 *
 * Ownership default: a pointer returned through an out-parameter of an `init` call is owned by
 * the caller and released with the matching `close`; strings returned as `const char*` are owned
 * by the library and live for the whole process unless the comment says otherwise. */
#ifndef THREADLOOM_COMMON_H
#define THREADLOOM_COMMON_H

#include <stddef.h>
#include <stdint.h>

#if defined(TL_BUILDING_LIBRARY)
#define TL_EXTERN __attribute__((visibility("default")))
#else
#define TL_EXTERN
#endif

#ifdef __cplusplus
#define TL_BEGIN_DECLS extern "C" {
#define TL_END_DECLS }
#else
#define TL_BEGIN_DECLS
#define TL_END_DECLS
#endif

/* threadloom's version: these three lines are its one source. CMake's project(VERSION), the
 * Python package's version (pyproject.toml: scikit-build-core reads them with a regex) and
 * threadloom.__version__ (tl_version_string() through _core) all come from here. */
#define TL_VERSION_MAJOR 0
#define TL_VERSION_MINOR 1
#define TL_VERSION_PATCH 0
#define TL__STR2(x) #x
#define TL__STR(x) TL__STR2(x)
/* "0.1.0" */
#define TL_VERSION_STRING \
  TL__STR(TL_VERSION_MAJOR) "." TL__STR(TL_VERSION_MINOR) "." TL__STR(TL_VERSION_PATCH)

#endif /* THREADLOOM_COMMON_H */
