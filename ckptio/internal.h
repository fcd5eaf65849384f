/* ckptio/internal.h: the system-call table of the checkpoint file writer.
 *
 * Every system call tl_wfile makes goes through one table of function pointers, so tests
 * inject faults (a file system refusing O_DIRECT at open or at write time, ENOSPC after N
 * bytes, io_uring refused by the kernel) through the path the real calls take. The functions
 * follow their system calls: -1 and errno on failure (uring_init: a negative errno). */
#ifndef THREADLOOM_CKPTIO_INTERNAL_H
#define THREADLOOM_CKPTIO_INTERNAL_H

#include <sys/types.h>

#include "core/internal.h"
#include "threadloom/ckptio.h"

typedef struct {
  const char* name;                                            /* "system" or a test's name */
  int (*open)(const char* path, int flags, mode_t mode);       /* open(2) */
  ssize_t (*pwrite)(int fd, const void* buf, size_t n, off_t off); /* pwrite(2), both fds */
  int (*fsync)(int fd);                                        /* fsync(2) */
  int (*close)(int fd);                                        /* close(2) */
  /* io_uring_queue_init(entries, ring, 0) when built with liburing; `ring` is a struct
   * io_uring*. Returns 0 or -errno. Without liburing the built-in one answers -ENOSYS. */
  int (*uring_init)(unsigned entries, void* ring);
} tl__wfile_sys_t;

/* The table in use. Thread-safe (an atomic load). */
const tl__wfile_sys_t* tl__wfile_sys(void);
/* Replaces the table (tests); returns the previous one. NULL restores the built-in one. */
const tl__wfile_sys_t* tl__wfile_set_sys(const tl__wfile_sys_t* sys);
/* The built-in table: the real system calls. */
extern const tl__wfile_sys_t tl__wfile_builtin;

/* How much one io_uring write submits per entry, and how many entries are in flight. */
#define TL__WFILE_URING_PIECE ((size_t)4 << 20)
#define TL__WFILE_URING_DEPTH 8u

#endif /* THREADLOOM_CKPTIO_INTERNAL_H */
