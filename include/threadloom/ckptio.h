/* threadloom/ckptio.h: writing checkpoint files, through the page cache, with O_DIRECT, or with
 * O_DIRECT writes submitted through io_uring.
 *
 * A buffered pwrite costs the writing thread a copy of every byte into the page cache (the
 * kernel's copy_folio_from_iter plus the file system's per-page bookkeeping: most of the CPU a
 * checkpoint save takes, measured in bench/bench_checkpoint.py). O_DIRECT hands the caller's
 * pages to the device instead, so a writer thread costs almost no CPU, at the price of
 * alignment: the file offset, the length and the memory address must be multiples of
 * TL_WFILE_ALIGN. tl_wfile_write() takes any range and splits it: the aligned middle goes
 * direct, an unaligned head or tail (a file's last few bytes) goes through the page cache on a
 * second descriptor of the same file; both land in the same inode, so tl_wfile_sync() makes all
 * of it durable. The bytes in the file are the same whichever way they went.
 *
 * Fallback, never failure: a file system that refuses O_DIRECT (EINVAL from open(2), as ramfs
 * and older tmpfs do, or from a write) gives a buffered file; io_uring asked for but not built
 * (liburing missing) or refused by the kernel (io_uring_disabled, seccomp) gives plain O_DIRECT.
 * tl_wfile_stats() says which mode is in use and why.
 *
 * Thread-safety: tl_wfile_write() and tl_wfile_stats() are thread-safe on one object for
 * disjoint ranges (concurrent writes of overlapping ranges leave either's bytes, as pwrite
 * does); open/sync/close follow the default of threadloom/common.h (no call on the object may
 * run concurrently with close). */
#ifndef THREADLOOM_CKPTIO_H
#define THREADLOOM_CKPTIO_H

#include "threadloom/common.h"

TL_BEGIN_DECLS

typedef struct tl_wfile_s tl_wfile_t;

/* The alignment O_DIRECT needs here: offsets, lengths and addresses (covers 512-byte and
 * 4 KiB logical blocks). Staging buffers meant for direct writes are allocated aligned to it. */
#define TL_WFILE_ALIGN ((size_t)4096)

typedef enum {
  TL_WFILE_BUFFERED = 0, /* pwrite(2) through the page cache */
  TL_WFILE_DIRECT = 1,   /* O_DIRECT pwrite(2) of the aligned part of each write */
  TL_WFILE_URING = 2     /* O_DIRECT, each write split into pieces in flight together on an
                            io_uring (one ring per file) */
} tl_wfile_mode_t;

typedef struct {
  tl_wfile_mode_t mode;    /* the mode in use now: the one asked for unless `why` says */
  char why[192];           /* why `mode` is below the one asked for ("" when it is not) */
  uint64_t direct_bytes;   /* bytes written with O_DIRECT (pwrite or io_uring) */
  uint64_t buffered_bytes; /* bytes written through the page cache */
} tl_wfile_stats_t;

/* Creates `path` (O_EXCL, mode 0644) for writing in mode `want`, or the best mode below it
 * that this file system and kernel allow. *out is owned by the caller: tl_wfile_close() it.
 * Errors: TL_EINVAL (want out of range, NULL argument), TL_ENOMEM, and open(2)'s errno
 * translated (TL_EACCES, TL_ENOENT, TL_EROFS, TL_ENOSPC, TL_EIO for EEXIST and the rest), with
 * the path in tl_err_detail(). */
TL_EXTERN int tl_wfile_open(tl_wfile_t** out, const char* path, tl_wfile_mode_t want);

/* Writes all `len` bytes of `buf` at `offset` (short writes are retried). Thread-safe for
 * disjoint ranges. A direct write the file system refuses (EINVAL) switches the file to
 * buffered mode for good and is redone buffered. Errors: write(2)'s errno translated
 * (TL_ENOSPC, TL_EIO, ...), detail "pwrite(<path>) at <offset>: <strerror>". */
TL_EXTERN int tl_wfile_write(tl_wfile_t* f, const void* buf, size_t len, uint64_t offset);

/* fsync(2): every byte written through either descriptor is durable when it returns 0.
 * Errors: fsync's errno translated (delayed allocation reports TL_ENOSPC here). */
TL_EXTERN int tl_wfile_sync(tl_wfile_t* f);

/* The mode, why, and byte counts so far. Thread-safe on one object. */
TL_EXTERN void tl_wfile_stats(tl_wfile_t* f, tl_wfile_stats_t* out);

/* Closes the descriptors and frees `f` (NULL: no-op). Returns the first close(2) error
 * translated; `f` is freed either way. */
TL_EXTERN int tl_wfile_close(tl_wfile_t* f);

/* 1 when this library was built with liburing (TL_WFILE_URING can be asked for), else 0. */
TL_EXTERN int tl_wfile_uring_built(void);

TL_END_DECLS

#endif /* THREADLOOM_CKPTIO_H */
