/* tests/c/test-ckptio.c: tl_wfile, the checkpoint file writer: every mode round trips the same
 * bytes, unaligned heads and tails go buffered, refusals of O_DIRECT and io_uring fall back
 * (injected through the system-call table, since the file system here may accept O_DIRECT),
 * errors carry the path, and threads writing disjoint ranges of one file (under TSan). */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ckptio/internal.h"
#include "task.h"
#include "threadloom/threadloom.h"

#define A TL_WFILE_ALIGN

static char dir[64];

static void make_dir(void) {
  /* In the test's working directory (the build tree): a real disk file system, not tmpfs. */
  strcpy(dir, "wfile-XXXXXX");
  ASSERT(mkdtemp(dir) != NULL);
}

static int rm_one(const char* p, const struct stat* s, int flag, struct FTW* f) {
  (void)s, (void)flag, (void)f;
  return remove(p);
}

static void remove_dir(void) { nftw(dir, rm_one, 8, FTW_DEPTH | FTW_PHYS); }

static void path_of(char* out, size_t cap, const char* name) {
  snprintf(out, cap, "%s/%s", dir, name);
}

/* An A-aligned buffer of n bytes (plus slack) filled with a pattern of `seed`. */
static unsigned char* pattern(size_t n, unsigned seed) {
  unsigned char* p = NULL;
  ASSERT_EQ(posix_memalign((void**)&p, A, n + 2 * A), 0);
  uint32_t x = seed * 2654435761u + 1;
  for (size_t i = 0; i < n + 2 * A; i++) {
    x = x * 1103515245u + 12345u;
    p[i] = (unsigned char)(x >> 16);
  }
  return p;
}

/* Asserts that the file holds exactly `n` bytes equal to `want`. */
static void check_file(const char* path, const unsigned char* want, size_t n) {
  int fd = open(path, O_RDONLY);
  ASSERT(fd >= 0);
  struct stat st;
  ASSERT_EQ(fstat(fd, &st), 0);
  ASSERT_EQ(st.st_size, (int64_t)n);
  unsigned char* got = malloc(n ? n : 1);
  ASSERT(got != NULL);
  size_t at = 0;
  while (at < n) {
    ssize_t k = pread(fd, got + at, n - at, (off_t)at);
    ASSERT(k > 0);
    at += (size_t)k;
  }
  close(fd);
  for (size_t i = 0; i < n; i++)
    if (got[i] != want[i]) TL_FAIL_AT("%s: byte %zu is %d, want %d", path, i, got[i], want[i]);
  free(got);
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

/* Writes `n` bytes of a pattern in pieces of `piece` (the last one shorter), from memory
 * shifted by `shift` bytes, starting at file offset 0; returns the stats. */
static tl_wfile_stats_t write_file(const char* name, tl_wfile_mode_t mode, size_t n,
                                   size_t piece, size_t shift) {
  char path[128];
  path_of(path, sizeof path, name);
  unsigned char* data = pattern(n, (unsigned)(n + piece + shift));
  tl_wfile_t* f;
  ASSERT_OK(tl_wfile_open(&f, path, mode));
  for (size_t off = 0; off < n; off += piece) {
    size_t k = n - off < piece ? n - off : piece;
    ASSERT_OK(tl_wfile_write(f, data + shift + off, k, off));
  }
  ASSERT_OK(tl_wfile_sync(f));
  tl_wfile_stats_t st;
  tl_wfile_stats(f, &st);
  ASSERT_OK(tl_wfile_close(f));
  check_file(path, data + shift, n);
  ASSERT_EQ(st.direct_bytes + st.buffered_bytes, n);
  free(data);
  return st;
}

TEST_IMPL(wfile_modes_round_trip) {
  make_dir();
  static const char* names[] = {"buffered", "direct", "uring"};
  for (int m = TL_WFILE_BUFFERED; m <= TL_WFILE_URING; m++) {
    /* 10 MiB + 123 bytes in 3 MiB pieces: full aligned pieces and an unaligned tail; the io_uring
     * path splits each piece further (4 MiB entries, 8 in flight). */
    size_t n = (10u << 20) + 123;
    tl_wfile_stats_t st = write_file(names[m], (tl_wfile_mode_t)m, n, 3u << 20, 0);
    fprintf(stderr, "%s: mode %d why '%s' direct %llu buffered %llu\n", names[m], st.mode, st.why,
            (unsigned long long)st.direct_bytes, (unsigned long long)st.buffered_bytes);
    ASSERT(st.mode <= (tl_wfile_mode_t)m);
    if (st.mode < (tl_wfile_mode_t)m) ASSERT(strlen(st.why) > 10); /* fell back: says why */
    else ASSERT_STR_EQ(st.why, "");
    if (st.mode == TL_WFILE_BUFFERED) {
      ASSERT_EQ(st.direct_bytes, 0);
    } else {
      ASSERT_EQ(st.buffered_bytes, 123); /* only the tail went through the page cache */
    }
    if (m == TL_WFILE_URING && !tl_wfile_uring_built()) ASSERT_CONTAINS(st.why, "liburing");
  }
  remove_dir();
  return 0;
}

TEST_IMPL(wfile_unaligned_sizes) {
  make_dir();
  static const size_t sizes[] = {0, 1, 100, A - 1, A, A + 1, 3 * A + 17, 5 * A};
  static const size_t pieces[] = {A, 4 * A, 1000, 3 * A + 5};
  static const size_t shifts[] = {0, 8, A - 8};
  int i = 0;
  for (size_t a = 0; a < sizeof sizes / sizeof *sizes; a++)
    for (size_t b = 0; b < sizeof pieces / sizeof *pieces; b++)
      for (size_t c = 0; c < sizeof shifts / sizeof *shifts; c++)
        for (int m = TL_WFILE_BUFFERED; m <= TL_WFILE_URING; m++) {
          char name[32];
          snprintf(name, sizeof name, "f%d", i++);
          tl_wfile_stats_t st = write_file(name, (tl_wfile_mode_t)m, sizes[a], pieces[b],
                                           shifts[c]);
          /* Memory shifted against the file offset can never go direct. */
          if (shifts[c] != 0) ASSERT_EQ(st.direct_bytes, 0);
          /* Aligned memory, aligned pieces: everything but the last partial block goes direct. */
          if (shifts[c] == 0 && pieces[b] % A == 0 && st.mode != TL_WFILE_BUFFERED)
            ASSERT_EQ(st.direct_bytes, sizes[a] / A * A);
        }
  /* A write starting mid-block: the head goes buffered, the aligned middle direct. */
  char path[128];
  path_of(path, sizeof path, "head");
  unsigned char* data = pattern(4 * A, 7);
  tl_wfile_t* f;
  ASSERT_OK(tl_wfile_open(&f, path, TL_WFILE_DIRECT));
  ASSERT_OK(tl_wfile_write(f, data, 100, 0));
  ASSERT_OK(tl_wfile_write(f, data + 100, 4 * A - 100, 100));
  tl_wfile_stats_t st;
  tl_wfile_stats(f, &st);
  if (st.mode == TL_WFILE_DIRECT) {
    ASSERT_EQ(st.direct_bytes, 3 * A);
    ASSERT_EQ(st.buffered_bytes, A);
  }
  ASSERT_OK(tl_wfile_close(f));
  check_file(path, data, 4 * A);
  free(data);
  remove_dir();
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Fallbacks and errors, injected through the system-call table
// ---------------------------------------------------------------------------------------------

static _Atomic int refuse_open_direct, refuse_write_direct, enospc_after = -1;
static _Atomic long written;

static int fake_open(const char* path, int flags, mode_t mode) {
  if ((flags & O_DIRECT) && atomic_load(&refuse_open_direct)) {
    /* As ramfs does: the file is created (with O_CREAT) before EINVAL is returned. */
    int fd = open(path, flags & ~O_DIRECT, mode);
    if (fd >= 0) close(fd);
    errno = EINVAL;
    return -1;
  }
  return open(path, flags, mode);
}

static ssize_t fake_pwrite(int fd, const void* buf, size_t n, off_t off) {
  int fl = fcntl(fd, F_GETFL);
  if ((fl & O_DIRECT) && atomic_load(&refuse_write_direct)) {
    errno = EINVAL;
    return -1;
  }
  int lim = atomic_load(&enospc_after);
  if (lim >= 0 && atomic_load(&written) + (long)n > lim) {
    errno = ENOSPC;
    return -1;
  }
  ssize_t k = pwrite(fd, buf, n, off);
  if (k > 0) atomic_fetch_add(&written, k);
  return k;
}

static int fake_uring_init(unsigned entries, void* ring) {
  (void)entries, (void)ring;
  return -EPERM; /* io_uring_disabled=2, or a seccomp filter */
}

static const tl__wfile_sys_t fake = {
    .name = "fake",
    .open = fake_open,
    .pwrite = fake_pwrite,
    .fsync = fsync,
    .close = close,
    .uring_init = fake_uring_init,
};

TEST_IMPL(wfile_direct_refused_falls_back) {
  make_dir();
  tl__wfile_set_sys(&fake);
  /* open(O_DIRECT) refused, as on ramfs: a buffered file that says why. */
  atomic_store(&refuse_open_direct, 1);
  tl_wfile_stats_t st = write_file("open", TL_WFILE_DIRECT, 3 * A + 5, A, 0);
  ASSERT_EQ(st.mode, TL_WFILE_BUFFERED);
  ASSERT_CONTAINS(st.why, "refuses O_DIRECT");
  ASSERT_EQ(st.direct_bytes, 0);
  st = write_file("open-uring", TL_WFILE_URING, 3 * A + 5, A, 0);
  ASSERT_EQ(st.mode, TL_WFILE_BUFFERED);
  atomic_store(&refuse_open_direct, 0);
  /* A direct write refused (a file system that accepts the flag but not the I/O): the write is
   * redone buffered and the file stays buffered. */
  atomic_store(&refuse_write_direct, 1);
  st = write_file("write", TL_WFILE_DIRECT, 8 * A + 1, 2 * A, 0);
  ASSERT_EQ(st.mode, TL_WFILE_BUFFERED);
  ASSERT_CONTAINS(st.why, "O_DIRECT write was refused");
  ASSERT_EQ(st.buffered_bytes, 8 * A + 1);
  atomic_store(&refuse_write_direct, 0);
  /* io_uring refused by the kernel: O_DIRECT pwrite, saying why. */
  st = write_file("uring", TL_WFILE_URING, 8 * A + 1, 2 * A, 0);
  ASSERT_EQ(st.mode, TL_WFILE_DIRECT);
  ASSERT_CONTAINS(st.why, tl_wfile_uring_built() ? "io_uring unavailable" : "liburing");
  ASSERT_EQ(st.direct_bytes, 8 * A);
  tl__wfile_set_sys(NULL);
  remove_dir();
  return 0;
}

TEST_IMPL(wfile_errors) {
  make_dir();
  tl_wfile_t* f = NULL;
  char path[128];
  ASSERT_EQ(tl_wfile_open(NULL, "x", TL_WFILE_BUFFERED), TL_EINVAL);
  ASSERT_EQ(tl_wfile_open(&f, "x", (tl_wfile_mode_t)7), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "mode 7");
  path_of(path, sizeof path, "missing/f");
  for (int m = TL_WFILE_BUFFERED; m <= TL_WFILE_URING; m++) {
    ASSERT_EQ(tl_wfile_open(&f, path, (tl_wfile_mode_t)m), TL_ENOENT);
    ASSERT(f == NULL);
    ASSERT_CONTAINS(tl_err_detail(), "missing/f");
  }
  path_of(path, sizeof path, "once");
  ASSERT_OK(tl_wfile_open(&f, path, TL_WFILE_DIRECT));
  ASSERT_OK(tl_wfile_close(f));
  ASSERT(tl_wfile_open(&f, path, TL_WFILE_DIRECT) < 0); /* O_EXCL: never overwrites */
  /* ENOSPC in the middle of a direct write and of a buffered tail. */
  tl__wfile_set_sys(&fake);
  unsigned char* data = pattern(16 * A, 3);
  for (int m = TL_WFILE_BUFFERED; m <= TL_WFILE_URING; m++) {
    for (int lim = 0; lim <= (int)(16 * A); lim += 6 * (int)A) {
      char name[32];
      snprintf(name, sizeof name, "full-%d-%d", m, lim);
      path_of(path, sizeof path, name);
      atomic_store(&written, 0);
      atomic_store(&enospc_after, lim);
      ASSERT_OK(tl_wfile_open(&f, path, (tl_wfile_mode_t)m));
      int rc = tl_wfile_write(f, data, 16 * A - 9, 0);
      if (m == TL_WFILE_URING && tl_wfile_uring_built() && lim > 0) {
        /* io_uring writes do not go through the table's pwrite: only the buffered tail. */
        ASSERT(rc == 0 || rc == TL_ENOSPC);
      } else {
        ASSERT_EQ(rc, TL_ENOSPC);
        ASSERT_CONTAINS(tl_err_detail(), name);
        ASSERT_CONTAINS(tl_err_detail(), "No space left");
      }
      ASSERT_OK(tl_wfile_close(f));
    }
  }
  atomic_store(&enospc_after, -1);
  tl__wfile_set_sys(NULL);
  free(data);
  ASSERT_OK(tl_wfile_close(NULL));
  remove_dir();
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Threads writing one file
// ---------------------------------------------------------------------------------------------

enum { THREADS = 4, CHUNKS = 24 };
static tl_wfile_t* shared_file;
static unsigned char* shared_data;
static size_t chunk_len;
static pthread_barrier_t start;

static void* writer(void* arg) {
  int id = (int)(intptr_t)arg;
  pthread_barrier_wait(&start);
  for (int c = id; c < CHUNKS; c += THREADS) {
    size_t off = (size_t)c * chunk_len;
    size_t len = c == CHUNKS - 1 ? chunk_len - 77 : chunk_len; /* an unaligned last chunk */
    ASSERT_OK(tl_wfile_write(shared_file, shared_data + off, len, off));
    if (c % 5 == 0) {
      tl_wfile_stats_t st;
      tl_wfile_stats(shared_file, &st);
      ASSERT(st.direct_bytes + st.buffered_bytes <= (uint64_t)CHUNKS * chunk_len);
    }
  }
  return NULL;
}

TEST_IMPL(wfile_threads_disjoint_ranges) {
  make_dir();
  chunk_len = 16 * A;
  size_t n = CHUNKS * chunk_len - 77;
  shared_data = pattern(CHUNKS * chunk_len, 11);
  for (int m = TL_WFILE_BUFFERED; m <= TL_WFILE_URING; m++) {
    char path[128], name[16];
    snprintf(name, sizeof name, "t%d", m);
    path_of(path, sizeof path, name);
    ASSERT_OK(tl_wfile_open(&shared_file, path, (tl_wfile_mode_t)m));
    ASSERT_EQ(pthread_barrier_init(&start, NULL, THREADS), 0);
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++)
      ASSERT_EQ(pthread_create(&th[i], NULL, writer, (void*)(intptr_t)i), 0);
    for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL);
    pthread_barrier_destroy(&start);
    ASSERT_OK(tl_wfile_sync(shared_file));
    tl_wfile_stats_t st;
    tl_wfile_stats(shared_file, &st);
    ASSERT_EQ(st.direct_bytes + st.buffered_bytes, n);
    ASSERT_OK(tl_wfile_close(shared_file));
    check_file(path, shared_data, n);
  }
  free(shared_data);
  remove_dir();
  return 0;
}
