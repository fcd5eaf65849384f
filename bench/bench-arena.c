/* bench/bench-arena.c: threadloom arenas against glibc malloc, mimalloc's default heap
 * (mi_malloc) and, with a GPU, cudaHostAlloc.
 *
 * One operation = allocate a block, write one byte per 4 KiB page, free a block: what a loader
 * thread does per staging buffer. The byte written in page k is at offset 64 * (k % 64) of the
 * page (--touch spread), so that the writes to a 64 KiB-aligned block do not all fall into one
 * L1 cache set; --touch page writes the first byte of every page instead (all in one set, with
 * mimalloc's segment header: it slows mimalloc's heaps, not glibc's unaligned blocks), --touch
 * fill writes the whole block (memset). With --live K each thread keeps its K newest blocks alive and
 * frees the oldest (K batches in flight, as a loader with prefetch holds them); K = 0 frees the
 * block it just allocated (the worst case for mimalloc, whose page empties on every free).
 * Every (block size, thread count) cell runs each allocator for the same wall time, all threads
 * started together at a barrier, split into --rounds R rounds (default 5) whose allocator order
 * alternates (arena, glibc, mi, then mi, glibc, arena, ...), so that a slow spell of a shared
 * machine falls on every allocator alike; the table prints each allocator's median ops/s and
 * the median and range of the rounds' arena/glibc ratios, all measured in this run.
 *
 * --clock cpu rates each thread by its own CPU time (CLOCK_THREAD_CPUTIME_ID) instead of the
 * wall clock and adds the threads' rates: what the threads would do with a core each, without
 * the time other processes took from them. On a shared machine that is the steadier figure
 * (contention between the threads still counts: they run at once, on whatever cores they get).
 *
 * The glibc baseline calls libc.so.6's own malloc/free, looked up with dlsym on libc's handle:
 * Debian's libmimalloc.so.2 exports malloc/free and __libc_malloc/__libc_free too, so in a
 * program linked against libthreadloom all four names are mimalloc (this benchmark's "glibc"
 * column measured mimalloc's default heap until 2026-11-23). Each run checks that a glibc
 * block is not mimalloc's.
 *
 *   tl-bench-arena [--sizes 64,4K,64K,1M,16M] [--threads 1,2,...] [--live 0,8] [--duration SEC]
 *                  [--rounds R] [--iters N] [--node N] [--touch spread|page|fill] [--clock wall|cpu]
 *                  [--json FILE]
 * Defaults: those five sizes, threads 1, 2, 4, ... up to max(8, nproc) and never above 16 (plus
 * nproc: past the core count the curve shows oversubscription), live 0 and 8, 1 s per cell per
 * allocator, no iteration cap, node 0, touch spread, clock wall. --json FILE also writes every
 * row as JSON (bench/report.py). */
#include <dlfcn.h>
#include <mimalloc.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "threadloom/threadloom.h"

#if defined(TL_BENCH_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

static void* (*glibc_malloc)(size_t); /* libc.so.6's own malloc, see the top of the file */
static void (*glibc_free)(void*);

#define MAX_LIST 16
#define MAX_LIVE 64
#define MAX_ROUNDS 64

// ---------------------------------------------------------------------------------------------
// The allocators under test
// ---------------------------------------------------------------------------------------------

typedef enum { IMPL_ARENA, IMPL_GLIBC, IMPL_MI, IMPL_CUDA, IMPL_COUNT } impl_t;
static const char* const impl_names[IMPL_COUNT] = {"arena", "glibc", "mi_malloc", "cudaHostAlloc"};
typedef enum { TOUCH_SPREAD, TOUCH_PAGE, TOUCH_FILL } touch_t;
static touch_t touch = TOUCH_SPREAD;
static int cpu_clock; /* --clock cpu: see the top of the file */

static tl_arena_t* arena; /* one arena for the whole run, shared by all threads */

static void* impl_alloc(impl_t impl, size_t size) {
  void* p = NULL;
  switch (impl) {
    case IMPL_ARENA:
      if (tl_arena_alloc(arena, size, 0, &p) != 0) {
        fprintf(stderr, "tl_arena_alloc(%zu): %s\n", size, tl_err_detail());
        exit(1);
      }
      return p;
    case IMPL_GLIBC: p = glibc_malloc(size); break;
    case IMPL_MI: p = mi_malloc(size); break;
    case IMPL_CUDA:
#if defined(TL_BENCH_WITH_CUDA)
      if (cudaHostAlloc(&p, size, cudaHostAllocDefault) != cudaSuccess) p = NULL;
#endif
      break;
    default: break;
  }
  if (!p) {
    fprintf(stderr, "%s(%zu) failed\n", impl_names[impl], size);
    exit(1);
  }
  return p;
}

static void impl_free(impl_t impl, void* p) {
  switch (impl) {
    case IMPL_ARENA: tl_arena_free(arena, p); break;
    case IMPL_GLIBC: glibc_free(p); break;
    case IMPL_MI: mi_free(p); break;
    case IMPL_CUDA:
#if defined(TL_BENCH_WITH_CUDA)
      cudaFreeHost(p);
#endif
      break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------------
// One cell: N threads, one allocator, one block size
// ---------------------------------------------------------------------------------------------

typedef struct {
  impl_t impl;             /* allocator */
  size_t size;             /* block size */
  double duration;         /* seconds */
  uint64_t max_iters;      /* per thread, 0 = no cap */
  int live;                /* blocks each thread keeps alive (0..MAX_LIVE) */
  pthread_barrier_t start; /* all threads (and the caller) start together */
  _Atomic uint64_t ops;    /* total operations, summed as threads finish */
  pthread_mutex_t lock;    /* guards cpu_rate */
  double cpu_rate;         /* --clock cpu: sum of the threads' ops per second of their CPU time */
} cell_t;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double thread_cpu_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void* cell_thread(void* arg) {
  cell_t* c = arg;
  uint64_t n = 0;
  pthread_barrier_wait(&c->start);
  double end = now_s() + c->duration, cpu0 = thread_cpu_s();
  void* ring[MAX_LIVE] = {0};
  do {
    volatile char* p = impl_alloc(c->impl, c->size);
    if (touch == TOUCH_FILL) memset((void*)p, 1, c->size);
    else
      for (size_t off = 0; off < c->size; off += 4096) {
        size_t line = touch == TOUCH_SPREAD ? (off >> 12 & 63) << 6 : 0; /* see the top */
        p[off + (line < c->size - off ? line : 0)] = 1;
      }
    void* old = (void*)p;
    if (c->live > 0) { /* keep the newest `live` blocks, free the oldest */
      int k = (int)(n % (uint64_t)c->live);
      old = ring[k];
      ring[k] = (void*)p;
    }
    if (old) impl_free(c->impl, old);
    n++;
    /* read the clock every 32 operations: it would otherwise cost as much as a small alloc */
  } while ((c->max_iters == 0 || n < c->max_iters) && ((n & 31) != 0 || now_s() < end));
  for (int k = 0; k < c->live; k++)
    if (ring[k]) impl_free(c->impl, ring[k]);
  double cpu = thread_cpu_s() - cpu0;
  atomic_fetch_add(&c->ops, n);
  pthread_mutex_lock(&c->lock);
  c->cpu_rate += cpu > 0 ? (double)n / cpu : 0;
  pthread_mutex_unlock(&c->lock);
  return NULL;
}

static double run_cell(impl_t impl, size_t size, int threads, int live, double duration,
                       uint64_t iters) {
  cell_t c = {.impl = impl, .size = size, .duration = duration, .max_iters = iters, .live = live};
  atomic_init(&c.ops, 0);
  pthread_mutex_init(&c.lock, NULL);
  pthread_barrier_init(&c.start, NULL, (unsigned)threads + 1);
  pthread_t t[64];
  for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, cell_thread, &c);
  pthread_barrier_wait(&c.start);
  double t0 = now_s();
  for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
  double dt = now_s() - t0;
  pthread_barrier_destroy(&c.start);
  pthread_mutex_destroy(&c.lock);
  return cpu_clock ? c.cpu_rate : (double)atomic_load(&c.ops) / dt;
}

static const impl_t impls[4] = {IMPL_ARENA, IMPL_GLIBC, IMPL_MI, IMPL_CUDA};

static int cmp_double(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

/* The median of v[0..n) (the mean of the middle two when n is even); v is left as it was. */
static double median(const double* v, int n) {
  double s[MAX_ROUNDS];
  memcpy(s, v, (size_t)n * sizeof *s);
  qsort(s, (size_t)n, sizeof *s, cmp_double);
  return n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

// ---------------------------------------------------------------------------------------------
// Arguments and the table
// ---------------------------------------------------------------------------------------------

static size_t parse_size(const char* s) {
  char* end;
  double v = strtod(s, &end);
  switch (*end) {
    case 'k': case 'K': v *= 1024; break;
    case 'm': case 'M': v *= 1024 * 1024; break;
    case 'g': case 'G': v *= 1024.0 * 1024 * 1024; break;
    default: break;
  }
  return (size_t)v;
}

static int parse_list(const char* s, size_t* out, int is_size) {
  int n = 0;
  char buf[256];
  snprintf(buf, sizeof buf, "%s", s);
  for (char* tok = strtok(buf, ","); tok && n < MAX_LIST; tok = strtok(NULL, ","))
    out[n++] = is_size ? parse_size(tok) : (size_t)atoi(tok);
  return n;
}

static void fmt_size(size_t s, char* out, size_t cap) {
  if (s >= (1 << 20) && s % (1 << 20) == 0) snprintf(out, cap, "%zu MiB", s >> 20);
  else if (s >= 1024 && s % 1024 == 0) snprintf(out, cap, "%zu KiB", s >> 10);
  else snprintf(out, cap, "%zu B", s);
}

/* Writes s as a JSON string literal (quotes, backslashes and control characters escaped). */
static void json_string(FILE* f, const char* s) {
  fputc('"', f);
  for (; *s; s++) {
    unsigned char ch = (unsigned char)*s;
    if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
    else if (ch < 0x20) fprintf(f, "\\u%04x", ch);
    else fputc(ch, f);
  }
  fputc('"', f);
}

static void usage(void) {
  fprintf(stderr, "usage: tl-bench-arena [--sizes 64,4K,64K,1M,16M] [--threads 1,2,..] "
                  "[--live 0,8] [--duration SEC] [--rounds R] [--iters N] [--node N] "
                  "[--touch spread|page|fill] [--clock wall|cpu] [--json FILE]\n");
  exit(2);
}

int main(int argc, char** argv) {
  size_t sizes[MAX_LIST] = {64, 4 << 10, 64 << 10, 1 << 20, 16 << 20}, threads[MAX_LIST];
  size_t lives[MAX_LIST] = {0, 8};
  int nsizes = 5, nthreads = 0, nlives = 2, node = 0;
  double duration = 1.0;
  int rounds = 5;
  uint64_t iters = 0;
  const char* json_path = NULL;
  long nproc = sysconf(_SC_NPROCESSORS_ONLN);
  if (nproc < 1) nproc = 1;
  long top = nproc > 8 ? (nproc < 16 ? nproc : 16) : 8;
  for (long t = 1; t <= top; t *= 2) threads[nthreads++] = (size_t)t;
  if (nproc <= 16 && (nproc & (nproc - 1)) != 0) threads[nthreads++] = (size_t)nproc;
  for (int i = 1; i < argc; i++) {
    if (i + 1 >= argc) usage();
    if (!strcmp(argv[i], "--sizes")) nsizes = parse_list(argv[++i], sizes, 1);
    else if (!strcmp(argv[i], "--threads")) nthreads = parse_list(argv[++i], threads, 0);
    else if (!strcmp(argv[i], "--live")) nlives = parse_list(argv[++i], lives, 0);
    else if (!strcmp(argv[i], "--duration")) duration = atof(argv[++i]);
    else if (!strcmp(argv[i], "--rounds")) rounds = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--iters")) iters = strtoull(argv[++i], NULL, 10);
    else if (!strcmp(argv[i], "--node")) node = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--touch")) {
      const char* t = argv[++i];
      if (!strcmp(t, "spread")) touch = TOUCH_SPREAD;
      else if (!strcmp(t, "page")) touch = TOUCH_PAGE;
      else if (!strcmp(t, "fill")) touch = TOUCH_FILL;
      else usage();
    } else if (!strcmp(argv[i], "--clock")) {
      const char* c = argv[++i];
      if (!strcmp(c, "wall")) cpu_clock = 0;
      else if (!strcmp(c, "cpu")) cpu_clock = 1;
      else usage();
    } else if (!strcmp(argv[i], "--json")) json_path = argv[++i];
    else usage();
  }
  if (rounds < 1 || rounds > MAX_ROUNDS) usage();
  size_t max_size = 0, max_threads = 0;
  for (int i = 0; i < nsizes; i++) {
    if (sizes[i] == 0) usage();
    if (sizes[i] > max_size) max_size = sizes[i];
  }
  for (int i = 0; i < nthreads; i++) {
    if (threads[i] < 1 || threads[i] > 64) usage();
    if (threads[i] > max_threads) max_threads = threads[i];
  }
  size_t max_live = 0;
  for (int i = 0; i < nlives; i++) {
    if (lives[i] > MAX_LIVE) usage();
    if (lives[i] > max_live) max_live = lives[i];
  }

  /* Each thread holds up to live + 1 blocks; mimalloc gives each thread's heap segments of its
   * own (64 MiB per thread), and a block of several MiB takes up to twice its size of the region
   * (measured: 14 live 16 MiB blocks exhausted 448 MiB), so budget that. */
  void* libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
  if (libc) { /* the POSIX idiom for function pointers from dlsym (ISO C has no cast for it) */
    *(void**)&glibc_malloc = dlsym(libc, "malloc");
    *(void**)&glibc_free = dlsym(libc, "free");
  }
  void* probe = glibc_malloc ? glibc_malloc(64) : NULL;
  if (!probe || mi_is_in_heap_region(probe)) {
    fprintf(stderr, "cannot reach glibc's own malloc (dlsym on libc.so.6: %s)\n",
                    probe ? "it returned a mimalloc block" : dlerror());
    return 1;
  }
  glibc_free(probe);

  tl_arena_options_t o = {.numa_node = node,
                          .size = max_threads * ((max_live + 2) * 2 * max_size + ((size_t)64 << 20)),
                          .pin = TL_ARENA_PIN_AUTO};
  double t0 = now_s();
  int err = tl_arena_init(&arena, &o);
  if (err) {
    fprintf(stderr, "tl_arena_init: %s: %s\n", tl_err_name(err), tl_err_detail());
    return 1;
  }
  tl_arena_stats_t st;
  tl_arena_stats(arena, &st);
  printf("arena: node %d, %zu MiB, reserved+bound+touched in %.3f s, %s\n", st.numa_node,
         st.size >> 20, now_s() - t0, st.pin_detail);

  FILE* js = NULL;
  if (json_path && !(js = fopen(json_path, "w"))) {
    perror(json_path);
    return 1;
  }
  int with_cuda = 0;
  int ndev = 0;
  err = tl_cuda_device_count(&ndev);
#if defined(TL_BENCH_WITH_CUDA)
  if (err == 0) with_cuda = 1;
  else printf("cudaHostAlloc baseline skipped: %s (%s)\n", tl_err_name(err), tl_err_detail());
#else
  printf("cudaHostAlloc baseline skipped: built with TL_WITH_CUDA=OFF\n");
#endif
  static const char* const touch_names[] = {"1 byte per 4 KiB page, spread over cache lines",
                                            "1 byte at the start of each 4 KiB page",
                                            "memset of the whole block"};
  printf("op = alloc + write (%s) + free the oldest of `live` kept blocks; %.2f s per cell per "
         "allocator in %d alternating rounds%s; ops/s by %s, the median of the rounds; "
         "arena/glibc: the median of the rounds' ratios and their range\nglibc = libc.so.6's "
         "malloc/free; mi = mimalloc %d's default heap (mi_malloc/mi_free)\n", touch_names[touch],
         duration, rounds, iters ? " (capped)" : "",
         cpu_clock ? "each thread's CPU time, summed over the threads" : "the wall clock",
         mi_version());
  printf("\n%-8s %7s %5s %14s %14s %14s %11s %11s %8s", "size", "threads", "live", "arena ops/s",
         "glibc ops/s", "mi ops/s", "arena/glibc", "range", "arena/mi");
  if (with_cuda) printf(" %14s %10s", "cudaHost ops/s", "arena/cuda");
  printf("\n");
  if (js) {
    fprintf(js, "{\"cores\": %ld, \"duration_s\": %g, \"clock\": \"%s\", \"numa_node\": %d, "
                "\"arena_mib\": %zu, \"pin_detail\": ", nproc, duration, cpu_clock ? "cpu" : "wall",
                st.numa_node, st.size >> 20);
    json_string(js, st.pin_detail);
    fprintf(js, ", \"rows\": [");
  }
  int first = 1;
  int nimpl = with_cuda ? 4 : 3;
  for (int li = 0; li < nlives; li++)
    for (int si = 0; si < nsizes; si++)
      for (int ti = 0; ti < nthreads; ti++) {
        int th = (int)threads[ti], lv = (int)lives[li];
        /* rate[k][r]: allocator k in round r; the order alternates between rounds */
        double rate[4][MAX_ROUNDS] = {{0}}, vs_glibc[MAX_ROUNDS], vs_mi[MAX_ROUNDS];
        for (int r = 0; r < rounds; r++) {
          for (int j = 0; j < nimpl; j++) {
            int k = r % 2 ? nimpl - 1 - j : j;
            rate[k][r] = run_cell(impls[k], sizes[si], th, lv, duration / rounds, iters);
          }
          vs_glibc[r] = rate[0][r] / rate[1][r];
          vs_mi[r] = rate[0][r] / rate[2][r];
        }
        double med[4];
        for (int k = 0; k < nimpl; k++) med[k] = median(rate[k], rounds);
        double rg = median(vs_glibc, rounds), rm = median(vs_mi, rounds);
        double lo = vs_glibc[0], hi = vs_glibc[0];
        for (int r = 1; r < rounds; r++) {
          lo = vs_glibc[r] < lo ? vs_glibc[r] : lo;
          hi = vs_glibc[r] > hi ? vs_glibc[r] : hi;
        }
        char sz[32], range[32];
        fmt_size(sizes[si], sz, sizeof sz);
        snprintf(range, sizeof range, "%.2f-%.2f", lo, hi);
        printf("%-8s %7d %5d %14.0f %14.0f %14.0f %10.2fx %11s %7.2fx", sz, th, lv, med[0],
               med[1], med[2], rg, range, rm);
        if (with_cuda) printf(" %14.0f %9.2fx", med[3], med[0] / med[3]);
        printf("%s\n", th > nproc ? " (>cores)" : "");
        fflush(stdout);
        if (js) {
          fprintf(js, "%s\n  {\"size\": %zu, \"threads\": %d, \"live\": %d, \"arena\": %.1f, "
                      "\"glibc\": %.1f, \"mi\": %.1f, \"arena_vs_glibc\": %.4f, "
                      "\"arena_vs_glibc_rounds\": [", first ? "" : ",", sizes[si], th, lv,
                  med[0], med[1], med[2], rg);
          for (int r = 0; r < rounds; r++) fprintf(js, "%s%.4f", r ? ", " : "", vs_glibc[r]);
          fprintf(js, "]");
          if (with_cuda) fprintf(js, ", \"cudaHostAlloc\": %.1f", med[3]);
          fprintf(js, "}");
          first = 0;
        }
      }
  tl_arena_stats(arena, &st);
  printf("\narena after the run: %zu bytes in use, peak %zu bytes, %llu allocs (%llu from the "
         "threads' caches), %llu failed\n", st.bytes_in_use, st.peak_bytes,
         (unsigned long long)st.allocs, (unsigned long long)st.cache_hits,
         (unsigned long long)st.failed_allocs);
  if (js) {
    fprintf(js, "\n]}\n");
    if (fclose(js) != 0) {
      perror(json_path);
      return 1;
    }
  }
  err = tl_arena_close(arena);
  return err == 0 ? 0 : 1;
}
