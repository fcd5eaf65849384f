/* ckptio/wfile.c: checkpoint files written buffered, with O_DIRECT, or through io_uring.
 *
 * A tl_wfile holds two descriptors of one file: `fd` (buffered, always) and `dfd` (O_DIRECT,
 * -1 when the file is buffered from the start). tl_wfile_write() sends the aligned middle of a
 * range to `dfd` (pwrite, or io_uring pieces in flight together) and everything else to `fd`;
 * fsync of either descriptor flushes the inode, so one fsync covers both. The page-cache pages
 * of a direct range are never dirtied by the buffered side, because a buffered piece only ever
 * covers the unaligned head or tail outside the aligned middle of its own call, and callers
 * write disjoint ranges.
 *
 * Concurrency: `mode` is atomic because any writing thread may lower it (a direct write the
 * file system refuses switches the file to buffered for good); the byte counters are atomic
 * because every writing thread adds to them. `why_lock` guards `why`; `ring_lock` guards the
 * ring (one caller submits and reaps at a time, so its completions are its own). Lock order:
 * ring_lock before why_lock (a refused io_uring write records why while holding the ring). */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifdef TL_HAVE_URING
#include <liburing.h>
#endif

#include "ckptio/internal.h"

// ---------------------------------------------------------------------------------------------
// The system-call table
// ---------------------------------------------------------------------------------------------

static int sys_open(const char* path, int flags, mode_t mode) { return open(path, flags, mode); }
static ssize_t sys_pwrite(int fd, const void* buf, size_t n, off_t off) {
  return pwrite(fd, buf, n, off);
}
static int sys_uring_init(unsigned entries, void* ring) {
#ifdef TL_HAVE_URING
  return io_uring_queue_init(entries, (struct io_uring*)ring, 0);
#else
  (void)entries;
  (void)ring;
  return -ENOSYS;
#endif
}

const tl__wfile_sys_t tl__wfile_builtin = {
    .name = "system",
    .open = sys_open,
    .pwrite = sys_pwrite,
    .fsync = fsync,
    .close = close,
    .uring_init = sys_uring_init,
};

static _Atomic(const tl__wfile_sys_t*) wfile_sys = &tl__wfile_builtin;

const tl__wfile_sys_t* tl__wfile_sys(void) { return atomic_load(&wfile_sys); }

const tl__wfile_sys_t* tl__wfile_set_sys(const tl__wfile_sys_t* sys) {
  return atomic_exchange(&wfile_sys, sys ? sys : &tl__wfile_builtin);
}

int tl_wfile_uring_built(void) {
#ifdef TL_HAVE_URING
  return 1;
#else
  return 0;
#endif
}

// ---------------------------------------------------------------------------------------------
// The object
// ---------------------------------------------------------------------------------------------

struct tl_wfile_s {
  int fd;                          /* buffered descriptor; owned */
  int dfd;                         /* O_DIRECT descriptor, -1 if none; owned */
  _Atomic int mode;                /* tl_wfile_mode_t in use; only ever lowered */
  _Atomic uint64_t direct_bytes;   /* bytes written through dfd (any writing thread adds) */
  _Atomic uint64_t buffered_bytes; /* bytes written through fd (any writing thread adds) */
  pthread_mutex_t why_lock;        /* guards why */
  char why[192];                   /* why mode is below the one asked for; "" if it is not */
  char* path;                      /* owned copy, for failure details */
#ifdef TL_HAVE_URING
  pthread_mutex_t ring_lock;       /* guards ring: one submitter-and-reaper at a time */
  int ring_ok;                     /* 1 once io_uring_queue_init succeeded (exit it in close) */
  struct io_uring ring;            /* the file's ring, TL__WFILE_URING_DEPTH entries */
#endif
};

static int sys_fail(const tl_wfile_t* f, const char* call, uint64_t offset, int err) {
  if (offset == UINT64_MAX)
    return tl__fail(tl_translate_sys_error(err), "%s(%s): %s", call, f->path, strerror(err));
  return tl__fail(tl_translate_sys_error(err), "%s(%s) at %llu: %s", call, f->path,
                  (unsigned long long)offset, strerror(err));
}

/* Lowers the mode to `to` (never raises it) and records why, once per lowering. */
static void lower_mode(tl_wfile_t* f, int to, const char* fmt, const char* arg) {
  int cur = atomic_load(&f->mode);
  while (cur > to) {
    if (atomic_compare_exchange_weak(&f->mode, &cur, to)) {
      pthread_mutex_lock(&f->why_lock);
      snprintf(f->why, sizeof f->why, fmt, arg);
      pthread_mutex_unlock(&f->why_lock);
      return;
    }
  }
}

int tl_wfile_open(tl_wfile_t** out, const char* path, tl_wfile_mode_t want) {
  tl__clear_detail();
  if (!out || !path) return tl__fail(TL_EINVAL, "tl_wfile_open: NULL argument");
  *out = NULL;
  if ((int)want < TL_WFILE_BUFFERED || want > TL_WFILE_URING)
    return tl__fail(TL_EINVAL, "tl_wfile_open: mode %d is not a tl_wfile_mode_t", (int)want);
  const tl__wfile_sys_t* sys = tl__wfile_sys();
  tl_wfile_t* f = calloc(1, sizeof *f);
  char* copy = strdup(path);
  if (!f || !copy) {
    free(f);
    free(copy);
    return tl__fail(TL_ENOMEM, "tl_wfile_open(%s)", path);
  }
  f->path = copy;
  f->fd = f->dfd = -1;
  pthread_mutex_init(&f->why_lock, NULL);
#ifdef TL_HAVE_URING
  pthread_mutex_init(&f->ring_lock, NULL);
#endif
  atomic_init(&f->mode, (int)want);
  /* Created buffered first (O_EXCL: never another's file), then opened again with O_DIRECT:
   * a file system that refuses O_DIRECT may still create the file before it says EINVAL (ramfs
   * does), so asking for O_DIRECT on the creating open would leave the path taken. */
  int rc = 0;
  f->fd = sys->open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (f->fd < 0) {
    rc = sys_fail(f, "open", UINT64_MAX, errno);
  } else if (want != TL_WFILE_BUFFERED) {
    f->dfd = sys->open(path, O_WRONLY | O_DIRECT | O_CLOEXEC, 0);
    if (f->dfd < 0 && errno == EINVAL) /* ramfs, tmpfs before Linux 6.6, some FUSE mounts */
      lower_mode(f, TL_WFILE_BUFFERED, "%s refuses O_DIRECT (open: EINVAL); writing through "
                 "the page cache", "this file system");
    else if (f->dfd < 0)
      rc = sys_fail(f, "open", UINT64_MAX, errno);
  }
  if (rc == 0 && want == TL_WFILE_URING && atomic_load(&f->mode) == TL_WFILE_URING) {
#ifdef TL_HAVE_URING
    int r = sys->uring_init(TL__WFILE_URING_DEPTH, &f->ring);
    if (r == 0) f->ring_ok = 1;
    else lower_mode(f, TL_WFILE_DIRECT, "io_uring unavailable (%s); O_DIRECT pwrite instead",
                    strerror(-r));
#else
    lower_mode(f, TL_WFILE_DIRECT, "%s; O_DIRECT pwrite instead",
               "built without liburing (install liburing-dev and rebuild)");
#endif
  }
  if (rc != 0) {
    char detail[512];
    tl__strlcpy(detail, tl_err_detail(), sizeof detail);
    tl_wfile_close(f); /* closes whichever descriptor was opened */
    return tl__fail(rc, "%s", detail);
  }
  *out = f;
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

#ifdef TL_HAVE_URING
/* Writes [p, p + n) at off (all aligned) as pieces in flight together on the ring. Returns n,
 * or -1 with errno (EINVAL: the file system refused; the caller falls back). A piece that
 * completes short is finished with O_DIRECT pwrite. */
static ssize_t uring_write(tl_wfile_t* f, const char* p, size_t n, uint64_t off) {
  const tl__wfile_sys_t* sys = tl__wfile_sys();
  size_t done = 0;
  int err = 0;
  pthread_mutex_lock(&f->ring_lock);
  while (done < n && !err) {
    size_t lens[TL__WFILE_URING_DEPTH], queued = 0;
    unsigned k = 0;
    while (k < TL__WFILE_URING_DEPTH && done + queued < n) {
      struct io_uring_sqe* sqe = io_uring_get_sqe(&f->ring);
      if (!sqe) break;
      size_t len = n - done - queued;
      if (len > TL__WFILE_URING_PIECE) len = TL__WFILE_URING_PIECE;
      io_uring_prep_write(sqe, f->dfd, p + done + queued, (unsigned)len, off + done + queued);
      io_uring_sqe_set_data64(sqe, k);
      lens[k++] = len;
      queued += len;
    }
    int r;
    do r = io_uring_submit(&f->ring);
    while (r == -EINTR);
    if (r < 0) {
      err = -r;
      break;
    }
    size_t shorts[TL__WFILE_URING_DEPTH];
    int got[TL__WFILE_URING_DEPTH];
    memset(got, 0, sizeof got);
    for (unsigned i = 0; i < k; i++) {
      struct io_uring_cqe* cqe;
      do r = io_uring_wait_cqe(&f->ring, &cqe);
      while (r == -EINTR);
      if (r < 0) { /* cannot happen with entries submitted; keep the ring consistent */
        err = -r;
        k = i;
        break;
      }
      unsigned idx = (unsigned)io_uring_cqe_get_data64(cqe);
      int res = cqe->res;
      io_uring_cqe_seen(&f->ring, cqe);
      if (idx >= TL__WFILE_URING_DEPTH) continue;
      got[idx] = 1;
      if (res < 0 && !err) err = -res;
      shorts[idx] = res < 0 ? 0 : (size_t)res;
    }
    if (err) break;
    /* Finish short pieces (rare: a signal, or a device splitting a request) synchronously. */
    size_t at = done;
    for (unsigned i = 0; i < k && !err; i++) {
      size_t w = got[i] ? shorts[i] : 0;
      while (w < lens[i]) {
        ssize_t m = sys->pwrite(f->dfd, p + at + w, lens[i] - w, (off_t)(off + at + w));
        if (m < 0 && errno == EINTR) continue;
        if (m <= 0) {
          err = m < 0 ? errno : EIO;
          break;
        }
        w += (size_t)m;
      }
      at += lens[i];
    }
    if (!err) done += queued;
  }
  pthread_mutex_unlock(&f->ring_lock);
  if (err) {
    errno = err;
    return -1;
  }
  return (ssize_t)n;
}
#endif

int tl_wfile_write(tl_wfile_t* f, const void* buf, size_t len, uint64_t offset) {
  tl__clear_detail();
  if (!f || (!buf && len)) return tl__fail(TL_EINVAL, "tl_wfile_write: NULL argument");
  const tl__wfile_sys_t* sys = tl__wfile_sys();
  const size_t A = TL_WFILE_ALIGN;
  const char* p = buf;
  while (len > 0) {
    int mode = atomic_load(&f->mode);
    if (mode != TL_WFILE_BUFFERED && offset % A == 0 && (uintptr_t)p % A == 0 && len >= A) {
      size_t mid = len & ~(A - 1);
      ssize_t n;
#ifdef TL_HAVE_URING
      if (mode == TL_WFILE_URING) n = uring_write(f, p, mid, offset);
      else
#endif
        n = sys->pwrite(f->dfd, p, mid, (off_t)offset);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EINVAL) {
        lower_mode(f, TL_WFILE_BUFFERED, "an O_DIRECT write was refused (EINVAL) by %s; "
                   "writing through the page cache", "this file system");
        continue;
      }
      if (n < 0) return sys_fail(f, "pwrite", offset, errno);
      if (n == 0) return sys_fail(f, "pwrite", offset, EIO);
      atomic_fetch_add(&f->direct_bytes, (uint64_t)n);
      p += n;
      len -= (size_t)n;
      offset += (uint64_t)n;
      continue;
    }
    /* Buffered: the whole rest, or, when memory and offset can become aligned together, only
     * the head up to the next aligned offset (the middle then goes direct). */
    size_t k = len;
    if (mode != TL_WFILE_BUFFERED && ((uintptr_t)p - offset) % A == 0 && offset % A != 0) {
      size_t head = A - offset % A;
      if (head < len) k = head;
    }
    ssize_t n = sys->pwrite(f->fd, p, k, (off_t)offset);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return sys_fail(f, "pwrite", offset, errno);
    if (n == 0) return sys_fail(f, "pwrite", offset, EIO);
    atomic_fetch_add(&f->buffered_bytes, (uint64_t)n);
    p += n;
    len -= (size_t)n;
    offset += (uint64_t)n;
  }
  return 0;
}

int tl_wfile_sync(tl_wfile_t* f) {
  tl__clear_detail();
  if (!f) return tl__fail(TL_EINVAL, "tl_wfile_sync: NULL argument");
  if (tl__wfile_sys()->fsync(f->fd) != 0) return sys_fail(f, "fsync", UINT64_MAX, errno);
  return 0;
}

void tl_wfile_stats(tl_wfile_t* f, tl_wfile_stats_t* out) {
  if (!f || !out) return;
  pthread_mutex_lock(&f->why_lock);
  out->mode = (tl_wfile_mode_t)atomic_load(&f->mode);
  tl__strlcpy(out->why, f->why, sizeof out->why);
  pthread_mutex_unlock(&f->why_lock);
  out->direct_bytes = atomic_load(&f->direct_bytes);
  out->buffered_bytes = atomic_load(&f->buffered_bytes);
}

int tl_wfile_close(tl_wfile_t* f) {
  if (!f) return 0;
  tl__clear_detail();
  const tl__wfile_sys_t* sys = tl__wfile_sys();
  int rc = 0;
#ifdef TL_HAVE_URING
  if (f->ring_ok) io_uring_queue_exit(&f->ring);
  pthread_mutex_destroy(&f->ring_lock);
#endif
  if (f->dfd >= 0 && sys->close(f->dfd) != 0) rc = sys_fail(f, "close", UINT64_MAX, errno);
  if (f->fd >= 0 && sys->close(f->fd) != 0 && rc == 0)
    rc = sys_fail(f, "close", UINT64_MAX, errno);
  pthread_mutex_destroy(&f->why_lock);
  free(f->path);
  free(f);
  return rc;
}
