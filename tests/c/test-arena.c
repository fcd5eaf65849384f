/* tests/c/test-arena.c: NUMA-local arenas (numa/arena.c).
 *
 * Runs without a GPU: placement is checked with move_pages on node 0 (every Linux machine has
 * one), pinning without a driver must degrade (AUTO) or fail (REQUIRE), and the pinned path is
 * proven with a fake CUDA backend that records the cudaHostRegister call. Each test runs in its
 * own forked child, so the process-wide list of retained regions starts empty in each. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "cudactx/internal.h"
#include "numa/internal.h"
#include "task.h"
#include "threadloom/threadloom.h"

#define MiB ((size_t)1 << 20)

static tl_arena_t* arena_new(int node, size_t size, tl_arena_pin_t pin) {
  tl_arena_options_t o = {.numa_node = node, .size = size, .pin = pin};
  tl_arena_t* a = NULL;
  ASSERT_OK(tl_arena_init(&a, &o));
  ASSERT(a != NULL);
  return a;
}

static int inside(const tl_arena_stats_t* s, const void* p, size_t n) {
  uintptr_t b = (uintptr_t)s->base, u = (uintptr_t)p;
  return u >= b && u + n <= b + s->size;
}

// ---------------------------------------------------------------------------------------------
// Basics
// ---------------------------------------------------------------------------------------------

TEST_IMPL(arena_basics) {
  /* Aligned blocks cost up to size + alignment of the region: 16 MiB alignments need room. */
  tl_arena_t* a = arena_new(0, 320 * MiB + 1, TL_ARENA_PIN_NEVER);
  tl_arena_stats_t s;
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.size, 384 * MiB); /* rounded up to the granule */
  ASSERT_EQ(s.numa_node, 0);
  ASSERT_EQ(s.pinned, 0);
  ASSERT_CONTAINS(s.pin_detail, "TL_ARENA_PIN_NEVER");
  ASSERT_EQ((uintptr_t)s.base % TL_ARENA_GRANULE, 0);
  ASSERT_EQ(s.bytes_in_use, 0);

  static const size_t sizes[] = {1, 100, 300, 4096, 65536, 200 * 1024, 1 * MiB, 3 * MiB + 17};
  static const size_t aligns[] = {0, 8, 64, 4096, 65536, 2 * MiB, TL_ARENA_MAX_ALIGNMENT};
  void* blocks[sizeof sizes / sizeof sizes[0] * sizeof aligns / sizeof aligns[0]];
  size_t n = 0, want = 0;
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
    for (size_t j = 0; j < sizeof aligns / sizeof aligns[0]; j++) {
      void* p = NULL;
      ASSERT_OK(tl_arena_alloc(a, sizes[i], aligns[j], &p));
      size_t al = aligns[j] ? aligns[j] : 64;
      if ((uintptr_t)p % al != 0) TL_FAIL_AT("%p is not aligned to %zu", p, al);
      ASSERT(inside(&s, p, sizes[i]));
      memset(p, (int)(n & 0xff), sizes[i]);
      blocks[n++] = p;
      want += sizes[i];
    }
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.blocks_in_use, n);
  ASSERT_EQ(s.allocs, n);
  ASSERT(s.bytes_in_use >= want); /* usable sizes, at least what was asked */
  ASSERT_EQ(s.peak_bytes, s.bytes_in_use);
  for (size_t i = 0; i < n; i++) ASSERT_EQ(((unsigned char*)blocks[i])[0], i & 0xff);
  for (size_t i = 0; i < n; i++) ASSERT_OK(tl_arena_free(a, blocks[i]));
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.bytes_in_use, 0);
  ASSERT_EQ(s.blocks_in_use, 0);
  ASSERT(s.peak_bytes >= want);
  ASSERT_EQ(s.failed_allocs, 0);

  /* A 64 KiB block with the default alignment takes the 64 KiB size class: mimalloc places it
   * 64-byte aligned anyway, so the arena does not over-allocate for the alignment (which cost
   * the 80 KiB class and mimalloc's slower aligned path). */
  void* p = NULL;
  ASSERT_OK(tl_arena_alloc(a, 65536, 0, &p));
  ASSERT_EQ((uintptr_t)p % 64, 0);
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.bytes_in_use, 65536);
  ASSERT_OK(tl_arena_free(a, p));
  ASSERT_OK(tl_arena_close(a));
  ASSERT_OK(tl_arena_close(NULL));
  return 0;
}

TEST_IMPL(arena_bad_arguments) {
  tl_arena_options_t o = {.numa_node = 0, .size = 64 * MiB, .pin = TL_ARENA_PIN_NEVER};
  tl_arena_t* a = (tl_arena_t*)&o;
  ASSERT_EQ(tl_arena_init(NULL, &o), TL_EINVAL);
  ASSERT_EQ(tl_arena_init(&a, NULL), TL_EINVAL);
  ASSERT(a == NULL); /* cleared on failure */
  o.size = 0;
  ASSERT_EQ(tl_arena_init(&a, &o), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "size is 0");
  o.size = SIZE_MAX;
  ASSERT_EQ(tl_arena_init(&a, &o), TL_EINVAL);
  o.size = 64 * MiB;
  o.pin = (tl_arena_pin_t)7;
  ASSERT_EQ(tl_arena_init(&a, &o), TL_EINVAL);
  o.pin = TL_ARENA_PIN_NEVER;

  a = arena_new(0, 64 * MiB, TL_ARENA_PIN_NEVER);
  void* p = &o;
  ASSERT_EQ(tl_arena_alloc(NULL, 64, 0, &p), TL_EINVAL);
  ASSERT(p == NULL);
  ASSERT_EQ(tl_arena_alloc(a, 64, 0, NULL), TL_EINVAL);
  ASSERT_EQ(tl_arena_alloc(a, 0, 0, &p), TL_EINVAL);
  ASSERT_EQ(tl_arena_alloc(a, 64, 3, &p), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "power of two");
  ASSERT_EQ(tl_arena_alloc(a, 64, 48, &p), TL_EINVAL);
  ASSERT_EQ(tl_arena_alloc(a, 64, TL_ARENA_MAX_ALIGNMENT * 2, &p), TL_EINVAL);
  ASSERT_EQ(tl_arena_free(a, NULL), TL_EINVAL);
  ASSERT_EQ(tl_arena_free(NULL, p), TL_EINVAL);
  int outside = 0;
  ASSERT_EQ(tl_arena_free(a, &outside), TL_EINVAL); /* not a block of this arena */
  ASSERT_CONTAINS(tl_err_detail(), "not inside");
  tl_arena_stats_t s;
  ASSERT_EQ(tl_arena_stats(NULL, &s), TL_EINVAL);
  ASSERT_EQ(tl_arena_stats(a, NULL), TL_EINVAL);
  int node;
  ASSERT_EQ(tl_arena_node_of(NULL, &node), TL_EINVAL);
  ASSERT_EQ(tl_arena_node_of(&node, NULL), TL_EINVAL);
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.allocs, 0);
  ASSERT_EQ(s.failed_allocs, 0); /* argument errors are not exhaustion */
  ASSERT_OK(tl_arena_close(a));
  return 0;
}

TEST_IMPL(arena_numa_node) {
  if (!tl_numa_available()) SKIP("the kernel reports no NUMA support");
  /* the default: nothing is resident until written, and a written page lands on the bound node */
  tl_arena_t* a = arena_new(0, 192 * MiB, TL_ARENA_PIN_NEVER);
  tl_arena_stats_t s;
  ASSERT_OK(tl_arena_stats(a, &s));
  int node = -1;
  ASSERT_EQ(tl_arena_node_of((char*)s.base + s.size - 4096, &node), TL_ENOENT);
  void* p;
  ASSERT_OK(tl_arena_alloc(a, 2 * MiB, 0, &p));
  memset(p, 1, 2 * MiB);
  ASSERT_OK(tl_arena_node_of((char*)p + MiB, &node));
  ASSERT_EQ(node, 0);
  ASSERT_OK(tl_arena_free(a, p));
  ASSERT_OK(tl_arena_close(a));

  /* prefault: every page is touched at init, so every page is on node 0 before any allocation
   * (a new region: the retained 192 MiB one is too small for this request) */
  tl_arena_options_t o = {.numa_node = 0, .size = 256 * MiB, .pin = TL_ARENA_PIN_NEVER,
                          .prefault = 1};
  ASSERT_OK(tl_arena_init(&a, &o));
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT(s.size >= 256 * MiB);
  for (size_t off = 0; off < s.size; off += 8 * MiB) {
    node = -1;
    ASSERT_OK(tl_arena_node_of((char*)s.base + off, &node));
    ASSERT_EQ(node, 0);
  }
  ASSERT_OK(tl_arena_close(a));

  /* no binding: the memory is somewhere the kernel chose, a real node */
  a = arena_new(-1, 64 * MiB, TL_ARENA_PIN_NEVER);
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.numa_node, -1);
  ASSERT_OK(tl_arena_alloc(a, 4096, 0, &p));
  ASSERT_OK(tl_arena_node_of(p, &node));
  ASSERT(node >= 0);
  ASSERT_OK(tl_arena_free(a, p));
  ASSERT_OK(tl_arena_close(a));

  /* a node the machine does not have */
  o = (tl_arena_options_t){.numa_node = 4000, .size = 64 * MiB, .pin = TL_ARENA_PIN_NEVER};
  ASSERT_EQ(tl_arena_init(&a, &o), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "NUMA node 4000");

  /* an unmapped page */
  ASSERT_EQ(tl_arena_node_of((void*)(uintptr_t)4096, &node), TL_ENOENT);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Stress: blocks allocated on one thread, freed on another
// ---------------------------------------------------------------------------------------------

#if defined(__SANITIZE_THREAD__)
#define STRESS_ITERS 150
#else
#define STRESS_ITERS 1500
#endif
#define STRESS_THREADS 6
#define STRESS_SLOTS 16
#define STRESS_LOCAL 3

typedef struct {
  void* p;      /* block */
  size_t size;  /* bytes asked for */
  uint32_t tag; /* written at both ends by the allocating thread */
  int owner;    /* allocating thread */
} stress_block_t;

static tl_arena_t* stress_arena;
static pthread_barrier_t stress_barrier;
static pthread_mutex_t stress_lock = PTHREAD_MUTEX_INITIALIZER;
static stress_block_t stress_slots[STRESS_SLOTS]; /* the exchange; under stress_lock */
static int stress_cross_frees[STRESS_THREADS];      /* per thread, no sharing */
static int stress_cached; /* 1: sizes from a few classes, so the threads' caches serve blocks
                             (a block handed out twice would break the tags), and thread 0
                             trims now and then; set before the threads start */

static uint64_t xorshift(uint64_t* s) {
  uint64_t x = *s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return *s = x;
}

static void stress_check_free(stress_block_t* b, int self) {
  unsigned char* c = b->p;
  uint32_t head, tail;
  memcpy(&head, c, sizeof head);
  memcpy(&tail, c + b->size - sizeof tail, sizeof tail);
  if (head != b->tag || tail != b->tag)
    TL_FAIL_AT("block %p of %zu bytes: tag %08x/%08x, want %08x", b->p, b->size, head, tail,
               b->tag);
  if (self >= 0 && b->owner != self) stress_cross_frees[self]++; /* -1: the main thread */
  ASSERT_OK(tl_arena_free(stress_arena, b->p));
  b->p = NULL;
}

static void* stress_thread(void* arg) {
  int self = (int)(intptr_t)arg;
  uint64_t rng = 0x9e3779b97f4a7c15ULL * (uint64_t)(self + 1);
  stress_block_t local[STRESS_LOCAL];
  memset(local, 0, sizeof local);
  pthread_barrier_wait(&stress_barrier);
  for (int it = 0; it < STRESS_ITERS; it++) {
    stress_block_t b;
    static const size_t classes[] = {64 * 1024, 100 * 1024, MiB, 3 * MiB + 17};
    if (stress_cached) b.size = classes[xorshift(&rng) % 4];
    else b.size = 64 * 1024 + (size_t)(xorshift(&rng) % (4 * MiB - 64 * 1024));
    if (stress_cached && self == 0 && it % 50 == 49) ASSERT_OK(tl_arena_trim(stress_arena));
    b.tag = (uint32_t)xorshift(&rng);
    b.owner = self;
    ASSERT_OK(tl_arena_alloc(stress_arena, b.size, 0, &b.p));
    unsigned char* c = b.p;
    memcpy(c, &b.tag, sizeof b.tag);
    memcpy(c + b.size - sizeof b.tag, &b.tag, sizeof b.tag);
    if (xorshift(&rng) % 2) {
      /* swap with a slot of the exchange: the block taken out was (likely) another thread's */
      stress_block_t out;
      int k = (int)(xorshift(&rng) % STRESS_SLOTS);
      pthread_mutex_lock(&stress_lock);
      out = stress_slots[k];
      stress_slots[k] = b;
      pthread_mutex_unlock(&stress_lock);
      if (out.p) stress_check_free(&out, self);
    } else {
      int k = (int)(xorshift(&rng) % STRESS_LOCAL);
      if (local[k].p) stress_check_free(&local[k], self);
      local[k] = b;
    }
  }
  for (int k = 0; k < STRESS_LOCAL; k++)
    if (local[k].p) stress_check_free(&local[k], self);
  return NULL; /* blocks left in the exchange outlive this thread and its heap */
}

static void stress_run(void) {
  stress_arena = arena_new(0, 1024 * MiB, TL_ARENA_PIN_AUTO);
  ASSERT_EQ(pthread_barrier_init(&stress_barrier, NULL, STRESS_THREADS), 0);
  pthread_t t[STRESS_THREADS];
  for (int i = 0; i < STRESS_THREADS; i++)
    ASSERT_EQ(pthread_create(&t[i], NULL, stress_thread, (void*)(intptr_t)i), 0);
  for (int i = 0; i < STRESS_THREADS; i++) ASSERT_EQ(pthread_join(t[i], NULL), 0);
  pthread_barrier_destroy(&stress_barrier);
  /* Every thread has exited: the main thread frees what they left in the exchange. */
  for (int k = 0; k < STRESS_SLOTS; k++)
    if (stress_slots[k].p) stress_check_free(&stress_slots[k], -1);
  int cross = 0;
  for (int i = 0; i < STRESS_THREADS; i++) cross += stress_cross_frees[i];
  ASSERT(cross > 0);
  tl_arena_stats_t s;
  ASSERT_OK(tl_arena_stats(stress_arena, &s));
  ASSERT_EQ(s.bytes_in_use, 0);
  ASSERT_EQ(s.blocks_in_use, 0);
  ASSERT_EQ(s.allocs, (uint64_t)STRESS_THREADS * STRESS_ITERS);
  ASSERT_EQ(s.failed_allocs, 0);
  ASSERT(s.peak_bytes > 4 * MiB);
  ASSERT_EQ(s.cached_blocks, 0); /* the threads emptied their caches at exit */
  if (stress_cached) ASSERT(s.cache_hits > 0);
  /* the memory the exited threads held is usable again */
  void* p;
  ASSERT_OK(tl_arena_alloc(stress_arena, 256 * MiB, 0, &p));
  ASSERT_OK(tl_arena_free(stress_arena, p));
  ASSERT_OK(tl_arena_close(stress_arena));
}

TEST_IMPL(arena_stress_threads) {
  stress_run();
  return 0;
}

TEST_IMPL(arena_stress_cached) {
  stress_cached = 1;
  stress_run();
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Exhaustion
// ---------------------------------------------------------------------------------------------

#define EXH_MAX 64

static int fill(tl_arena_t* a, size_t size, void** blocks, tl_arena_stats_t* s) {
  int n = 0;
  for (;;) {
    ASSERT(n < EXH_MAX);
    int err = tl_arena_alloc(a, size, 0, &blocks[n]);
    if (err == TL_ENOMEM) break;
    ASSERT_OK(err);
    ASSERT(inside(s, blocks[n], size));
    memset(blocks[n], 0x5a, size);
    n++;
  }
  return n;
}

TEST_IMPL(arena_exhaustion) {
  tl_arena_t* a = arena_new(0, 64 * MiB, TL_ARENA_PIN_NEVER);
  tl_arena_stats_t s;
  ASSERT_OK(tl_arena_stats(a, &s));
  void* blocks[EXH_MAX];
  int n = fill(a, 4 * MiB, blocks, &s);
  ASSERT(n >= 8); /* most of 64 MiB holds 4 MiB blocks */
  ASSERT_CONTAINS(tl_err_detail(), "arena on node 0 (64 MiB)");
  ASSERT_CONTAINS(tl_err_detail(), "block(s) in use");
  ASSERT_CONTAINS(tl_err_detail(), "create a larger arena");
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.failed_allocs, 1);
  ASSERT_EQ(s.blocks_in_use, n);
  /* a second failure, and one larger than the whole region */
  void* p;
  ASSERT_EQ(tl_arena_alloc(a, 4 * MiB, 0, &p), TL_ENOMEM);
  ASSERT(p == NULL);
  ASSERT_EQ(tl_arena_alloc(a, 65 * MiB, 0, &p), TL_ENOMEM);
  ASSERT_CONTAINS(tl_err_detail(), "larger than the region");

  /* recovery: after frees the same amount fits again */
  for (int i = 0; i < n; i++) ASSERT_OK(tl_arena_free(a, blocks[i]));
  int again = fill(a, 4 * MiB, blocks, &s);
  ASSERT_EQ(again, n);
  for (int i = 0; i < again; i++) ASSERT_OK(tl_arena_free(a, blocks[i]));
  /* and other sizes fit too */
  ASSERT_OK(tl_arena_alloc(a, 32 * MiB, 0, &p));
  ASSERT_OK(tl_arena_free(a, p));
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.bytes_in_use, 0);
  ASSERT_EQ(s.failed_allocs, 4);
  ASSERT_OK(tl_arena_close(a));
  return 0;
}

static tl_arena_t* exh_arena;
static void* exh_blocks[EXH_MAX];
static int exh_n;

static void* exh_filler(void* arg) {
  (void)arg;
  tl_arena_stats_t s;
  ASSERT_OK(tl_arena_stats(exh_arena, &s));
  exh_n = fill(exh_arena, 4 * MiB, exh_blocks, &s);
  return NULL;
}

TEST_IMPL(arena_exhaustion_other_thread) {
  /* A thread fills the arena and exits; the main thread frees its blocks and must be able to
   * use the whole arena (the exited thread's heap was abandoned by mimalloc). */
  exh_arena = arena_new(0, 64 * MiB, TL_ARENA_PIN_NEVER);
  pthread_t t;
  ASSERT_EQ(pthread_create(&t, NULL, exh_filler, NULL), 0);
  ASSERT_EQ(pthread_join(t, NULL), 0);
  ASSERT(exh_n >= 8);
  void* p;
  ASSERT_EQ(tl_arena_alloc(exh_arena, 4 * MiB, 0, &p), TL_ENOMEM);
  for (int i = 0; i < exh_n; i++) ASSERT_OK(tl_arena_free(exh_arena, exh_blocks[i]));
  tl_arena_stats_t s;
  ASSERT_OK(tl_arena_stats(exh_arena, &s));
  void* mine[EXH_MAX];
  int n = fill(exh_arena, 4 * MiB, mine, &s);
  ASSERT_EQ(n, exh_n);
  for (int i = 0; i < n; i++) ASSERT_OK(tl_arena_free(exh_arena, mine[i]));
  ASSERT_OK(tl_arena_close(exh_arena));
  return 0;
}

static void* exit_worker(void* arg) {
  (void)arg;
  void* p;
  ASSERT_OK(tl_arena_alloc(exh_arena, MiB, 0, &p)); /* creates this thread's heap and anchor */
  ASSERT_OK(tl_arena_free(exh_arena, p));
  return NULL;
}

TEST_IMPL(arena_thread_exit_gives_segment_back) {
  /* Each heap keeps a 1-byte anchor block, and with it a segment (all of this 64 MiB arena),
   * until its thread exits. After the worker exits, a block that needs the whole arena (above
   * 32 MiB mimalloc takes a segment for one block) must fit: the worker's anchor was freed at
   * its exit, and the main thread gives up its own anchor rather than fail. */
  exh_arena = arena_new(0, 64 * MiB, TL_ARENA_PIN_NEVER);
  pthread_t t;
  ASSERT_EQ(pthread_create(&t, NULL, exit_worker, NULL), 0);
  ASSERT_EQ(pthread_join(t, NULL), 0);
  void* p;
  ASSERT_OK(tl_arena_alloc(exh_arena, 40 * MiB, 0, &p));
  memset(p, 1, 40 * MiB);
  ASSERT_OK(tl_arena_free(exh_arena, p));
  /* and again, now that the main thread's heap has no anchor */
  ASSERT_OK(tl_arena_alloc(exh_arena, 40 * MiB, 0, &p));
  ASSERT_OK(tl_arena_free(exh_arena, p));
  tl_arena_stats_t s;
  ASSERT_OK(tl_arena_stats(exh_arena, &s));
  ASSERT_EQ(s.failed_allocs, 0);
  ASSERT_OK(tl_arena_close(exh_arena));
  return 0;
}

static void* churn_worker(void* arg) {
  tl_arena_t* a = arg;
  void* p;
  if (tl_arena_alloc(a, 64 << 10, 0, &p) != 0) return (void*)1;
  memset(p, 1, 64 << 10);
  return tl_arena_free(a, p) == 0 ? NULL : (void*)1;
}

TEST_IMPL(arena_thread_churn_reuses_counter_slots) {
  /* 400 threads, 4 alive at a time, each allocating and freeing once: an exited thread's
   * counter shard goes to the next thread, so the slots handed out stay at the 4 alive at once
   * (without recycling, all 127 exclusive slots were gone after 127 threads and every later
   * thread updated one shared shard with atomics), and the counts stay exact. */
  tl_arena_t* a = arena_new(0, 384 * MiB, TL_ARENA_PIN_NEVER);
  unsigned before = tl__arena_slots_handed_out();
  for (int round = 0; round < 100; round++) {
    pthread_t t[4];
    for (int i = 0; i < 4; i++) ASSERT_EQ(pthread_create(&t[i], NULL, churn_worker, a), 0);
    for (int i = 0; i < 4; i++) {
      void* rv = (void*)1;
      ASSERT_EQ(pthread_join(t[i], &rv), 0);
      ASSERT(rv == NULL);
    }
  }
  unsigned used = tl__arena_slots_handed_out() - before;
  if (used > 4) TL_FAIL_AT("400 threads, 4 at a time, took %u counter slots (want <= 4)", used);
  tl_arena_stats_t s;
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.allocs, 400);
  ASSERT_EQ(s.bytes_in_use, 0);
  ASSERT_EQ(s.blocks_in_use, 0);
  ASSERT_EQ(s.failed_allocs, 0);
  ASSERT_OK(tl_arena_close(a));
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Per-thread block caches
// ---------------------------------------------------------------------------------------------

TEST_IMPL(arena_cache_reuse_and_caps) {
  /* 64 MiB region: each thread caches at most 8 blocks and 4 MiB (1/16 of the region). */
  tl_arena_t* a = arena_new(0, 64 * MiB, TL_ARENA_PIN_NEVER);
  tl_arena_stats_t s;
  void *p, *q, *blocks[10];
  ASSERT_OK(tl_arena_alloc(a, 65536, 0, &p));
  ASSERT_OK(tl_arena_free(a, p));
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.bytes_in_use, 0);
  ASSERT_EQ(s.blocks_in_use, 0);
  ASSERT_EQ(s.cached_blocks, 1);
  ASSERT_EQ(s.cached_bytes, 65536);
  ASSERT_EQ(s.cache_hits, 0);
  /* the same request takes the same block back; the accounting counts it as in use again */
  ASSERT_OK(tl_arena_alloc(a, 65536, 0, &q));
  ASSERT(q == p);
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cache_hits, 1);
  ASSERT_EQ(s.allocs, 2);
  ASSERT_EQ(s.bytes_in_use, 65536);
  ASSERT_EQ(s.blocks_in_use, 1);
  ASSERT_EQ(s.cached_blocks, 0);
  ASSERT_EQ(s.cached_bytes, 0);
  /* another size does not take a cached 64 KiB block (its usable size differs) */
  ASSERT_OK(tl_arena_free(a, q));
  ASSERT_OK(tl_arena_alloc(a, 65537, 0, &q));
  ASSERT(q != p);
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cache_hits, 1);
  ASSERT_EQ(s.cached_blocks, 1);
  ASSERT_EQ(s.bytes_in_use, 81920); /* mimalloc's size class for 64 KiB + 1 */
  ASSERT_OK(tl_arena_free(a, q));

  /* count bound: 10 blocks freed, the 8 newest are cached, the oldest went back to mimalloc */
  ASSERT_OK(tl_arena_trim(a));
  for (int i = 0; i < 10; i++) ASSERT_OK(tl_arena_alloc(a, 65536, 0, &blocks[i]));
  for (int i = 0; i < 10; i++) ASSERT_OK(tl_arena_free(a, blocks[i]));
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cached_blocks, 8);
  ASSERT_EQ(s.cached_bytes, 8 * 65536);
  ASSERT_EQ(s.blocks_in_use, 0);
  /* LIFO: the newest first */
  ASSERT_OK(tl_arena_alloc(a, 65536, 0, &p));
  ASSERT(p == blocks[9]);
  ASSERT_OK(tl_arena_free(a, p));

  /* byte bound: 4 MiB per thread here, so five 1 MiB blocks leave four cached (the 64 KiB
   * ones are evicted first, being older); a block above the bound is never cached */
  for (int i = 0; i < 5; i++) ASSERT_OK(tl_arena_alloc(a, MiB, 0, &blocks[i]));
  for (int i = 0; i < 5; i++) ASSERT_OK(tl_arena_free(a, blocks[i]));
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cached_bytes, 4 * MiB);
  ASSERT_EQ(s.cached_blocks, 4);
  ASSERT_OK(tl_arena_alloc(a, 5 * MiB, 0, &p));
  ASSERT_OK(tl_arena_free(a, p));
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cached_bytes, 4 * MiB);

  /* trim gives everything back */
  ASSERT_OK(tl_arena_trim(a));
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cached_bytes, 0);
  ASSERT_EQ(s.cached_blocks, 0);
  ASSERT_EQ(tl_arena_trim(NULL), TL_EINVAL);
  ASSERT_OK(tl_arena_close(a));
  return 0;
}

TEST_IMPL(arena_cache_alignment) {
  /* A cached block serves a request only at an address with the requested alignment. Blocks of
   * 300 bytes (the 320-byte class, 64-byte aligned) are cached, then requested with larger
   * alignments: whatever comes back, from the cache or from mimalloc, is aligned. */
  tl_arena_t* a = arena_new(0, 64 * MiB, TL_ARENA_PIN_NEVER);
  static const size_t aligns[] = {64, 128, 256, 4096, 64, 512};
  void* blocks[8];
  int misaligned_cached = 0;
  for (size_t k = 0; k < sizeof aligns / sizeof aligns[0]; k++) {
    for (int i = 0; i < 8; i++) {
      ASSERT_OK(tl_arena_alloc(a, 300, aligns[k], &blocks[i]));
      if ((uintptr_t)blocks[i] % aligns[k] != 0)
        TL_FAIL_AT("%p is not aligned to %zu", blocks[i], aligns[k]);
    }
    for (int i = 0; i < 8; i++) {
      misaligned_cached += (uintptr_t)blocks[i] % 512 != 0;
      ASSERT_OK(tl_arena_free(a, blocks[i]));
    }
  }
  ASSERT(misaligned_cached > 0); /* the cache did hold blocks a 512-byte request must skip */
  tl_arena_stats_t s;
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT(s.cache_hits > 0);
  ASSERT_OK(tl_arena_trim(a));
  ASSERT_OK(tl_arena_close(a));
  return 0;
}

/* A worker thread driven step by step by the main thread: each step is one command. */
typedef enum { W_ALLOC_FREE, W_FREE_GIVEN, W_ALLOC_KEEP, W_FREE_KEPT, W_EXIT } w_cmd_t;
static tl_arena_t* w_arena;
static pthread_barrier_t w_go, w_done;
static w_cmd_t w_cmd;
static size_t w_size;
static void* w_given[8]; /* blocks the main thread hands over (W_FREE_GIVEN) */
static int w_given_n;
static void* w_kept[8]; /* blocks the worker allocated and keeps (W_ALLOC_KEEP) */
static int w_kept_n;

static void* w_thread(void* arg) {
  (void)arg;
  for (;;) {
    pthread_barrier_wait(&w_go);
    void* p;
    switch (w_cmd) {
      case W_ALLOC_FREE: /* one call of each, which also empties a cache asked to empty */
        ASSERT_OK(tl_arena_alloc(w_arena, w_size, 0, &p));
        ASSERT_OK(tl_arena_free(w_arena, p));
        break;
      case W_FREE_GIVEN:
        for (int i = 0; i < w_given_n; i++) ASSERT_OK(tl_arena_free(w_arena, w_given[i]));
        break;
      case W_ALLOC_KEEP:
        ASSERT_OK(tl_arena_alloc(w_arena, w_size, 0, &w_kept[w_kept_n]));
        w_kept_n++;
        break;
      case W_FREE_KEPT:
        for (int i = 0; i < w_kept_n; i++) ASSERT_OK(tl_arena_free(w_arena, w_kept[i]));
        w_kept_n = 0;
        break;
      case W_EXIT: pthread_barrier_wait(&w_done); return NULL;
    }
    pthread_barrier_wait(&w_done);
  }
}

static void w_start(pthread_t* t, tl_arena_t* a) {
  w_arena = a;
  ASSERT_EQ(pthread_barrier_init(&w_go, NULL, 2), 0);
  ASSERT_EQ(pthread_barrier_init(&w_done, NULL, 2), 0);
  ASSERT_EQ(pthread_create(t, NULL, w_thread, NULL), 0);
}

static void w_run(w_cmd_t cmd, size_t size) {
  w_cmd = cmd;
  w_size = size;
  pthread_barrier_wait(&w_go);
  pthread_barrier_wait(&w_done);
}

static void w_stop(pthread_t t) {
  w_run(W_EXIT, 0);
  ASSERT_EQ(pthread_join(t, NULL), 0);
  pthread_barrier_destroy(&w_go);
  pthread_barrier_destroy(&w_done);
}

TEST_IMPL(arena_cache_cross_thread_and_exit) {
  /* A block the main thread allocated and the worker frees goes into the worker's cache, the
   * worker's next allocation of that size takes it, and the worker's exit empties its cache. */
  tl_arena_t* a = arena_new(0, 192 * MiB, TL_ARENA_PIN_NEVER);
  pthread_t t;
  w_start(&t, a);
  w_run(W_ALLOC_FREE, MiB); /* the worker allocates too: it has a heap and a cache */
  w_run(W_ALLOC_KEEP, MiB); /* ... and takes its own block back from the cache */
  tl_arena_stats_t s;
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cache_hits, 1);
  ASSERT_EQ(s.cached_blocks, 0);
  void* mine;
  ASSERT_OK(tl_arena_alloc(a, MiB, 0, &mine));
  w_given[0] = mine;
  w_given_n = 1;
  w_run(W_FREE_GIVEN, 0);
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cached_blocks, 1);
  ASSERT_EQ(s.cached_bytes, MiB);
  ASSERT_EQ(s.blocks_in_use, 1); /* the worker's kept block */
  w_run(W_ALLOC_KEEP, MiB);
  ASSERT(w_kept[1] == mine); /* the main thread's block, from the worker's cache */
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cache_hits, 2);
  ASSERT_EQ(s.blocks_in_use, 2);
  w_run(W_FREE_KEPT, 0);
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cached_blocks, 2);
  ASSERT_EQ(s.blocks_in_use, 0);
  /* a thread that never allocated in the arena frees straight to mimalloc (no cache) */
  w_stop(t);
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cached_blocks, 0); /* emptied at the worker's exit */
  ASSERT_EQ(s.cached_bytes, 0);
  ASSERT_OK(tl_arena_close(a));
  return 0;
}

TEST_IMPL(arena_cache_free_only_thread) {
  /* A thread that only frees (a consumer) does not cache: its blocks go back to mimalloc. */
  tl_arena_t* a = arena_new(0, 64 * MiB, TL_ARENA_PIN_NEVER);
  pthread_t t;
  w_start(&t, a);
  for (int i = 0; i < 3; i++) ASSERT_OK(tl_arena_alloc(a, 65536, 0, &w_given[i]));
  w_given_n = 3;
  w_run(W_FREE_GIVEN, 0);
  tl_arena_stats_t s;
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cached_blocks, 0);
  ASSERT_EQ(s.blocks_in_use, 0);
  w_stop(t);
  ASSERT_OK(tl_arena_close(a));
  return 0;
}

TEST_IMPL(arena_cache_trim_other_thread) {
  /* tl_arena_trim empties the caller's cache now and the worker's at its next call. */
  tl_arena_t* a = arena_new(0, 192 * MiB, TL_ARENA_PIN_NEVER);
  pthread_t t;
  w_start(&t, a);
  w_run(W_ALLOC_FREE, MiB);
  void* p;
  ASSERT_OK(tl_arena_alloc(a, 2 * MiB, 0, &p));
  ASSERT_OK(tl_arena_free(a, p));
  tl_arena_stats_t s;
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cached_bytes, 3 * MiB);
  ASSERT_OK(tl_arena_trim(a));
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cached_bytes, MiB); /* the worker's, until it calls */
  ASSERT_EQ(s.cached_blocks, 1);
  w_run(W_ALLOC_FREE, 65536);
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cached_bytes, 65536); /* the 1 MiB block went back; the new one is cached */
  ASSERT_EQ(s.cache_hits, 0);
  w_stop(t);
  ASSERT_OK(tl_arena_close(a));
  return 0;
}

TEST_IMPL(arena_cache_exhaustion_bound) {
  /* The main thread's blocks sit in the worker's cache while the main thread fills the arena:
   * the failure reports them, and once the worker has called into the arena again they are
   * the main thread's to allocate. Nothing else is missing: exactly those blocks come back. */
  tl_arena_t* a = arena_new(0, 256 * MiB, TL_ARENA_PIN_NEVER); /* 16 MiB cache per thread */
  pthread_t t;
  w_start(&t, a);
  w_run(W_ALLOC_FREE, 4096); /* the worker's heap, segment and cache */
  tl_arena_stats_t s;
  ASSERT_OK(tl_arena_stats(a, &s));
  void* blocks[EXH_MAX];
  int n0 = fill(a, 4 * MiB, blocks, &s);
  ASSERT(n0 >= 8);
  for (int i = 0; i < 4; i++) w_given[i] = blocks[i];
  w_given_n = 4;
  /* 16 MiB of the main thread's blocks into the worker's cache, which evicts its own 4 KiB
   * block to stay within its 16 MiB */
  w_run(W_FREE_GIVEN, 0);
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cached_bytes, 16 * MiB);
  ASSERT_EQ(s.cached_blocks, 4);
  void* more[EXH_MAX];
  ASSERT_EQ(fill(a, 4 * MiB, more, &s), 0);
  ASSERT_CONTAINS(tl_err_detail(), "16777216 bytes in 4 block(s) cached by other threads");
  w_run(W_ALLOC_FREE, 4096); /* the worker's next call gives its cache back */
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.cached_bytes, 4096);
  ASSERT_EQ(fill(a, 4 * MiB, more, &s), 4);
  for (int i = 4; i < n0; i++) ASSERT_OK(tl_arena_free(a, blocks[i]));
  for (int i = 0; i < 4; i++) ASSERT_OK(tl_arena_free(a, more[i]));
  w_stop(t);
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.blocks_in_use, 0);
  ASSERT_OK(tl_arena_close(a));
  return 0;
}

TEST_IMPL(arena_cache_region_reuse) {
  /* A worker's cache survives tl_arena_close of its region's arena; the next arena on the
   * region sees those blocks as cached (not in use), the worker's next call gives them back
   * instead of serving them, and no block is handed out twice. */
  tl_arena_t* a = arena_new(0, 192 * MiB, TL_ARENA_PIN_NEVER);
  pthread_t t;
  w_start(&t, a);
  w_run(W_ALLOC_KEEP, MiB);
  w_run(W_ALLOC_KEEP, MiB);
  void* first[2] = {w_kept[0], w_kept[1]};
  w_run(W_FREE_KEPT, 0); /* both cached by the worker */
  void* p;
  ASSERT_OK(tl_arena_alloc(a, MiB, 0, &p));
  ASSERT_OK(tl_arena_free(a, p)); /* and one by the main thread */
  tl_arena_stats_t s1, s2;
  ASSERT_OK(tl_arena_stats(a, &s1));
  ASSERT_EQ(s1.cached_blocks, 3);
  ASSERT_OK(tl_arena_close(a)); /* cached blocks do not keep it busy */

  tl_arena_t* b = arena_new(0, 64 * MiB, TL_ARENA_PIN_NEVER);
  w_arena = b;
  ASSERT_OK(tl_arena_stats(b, &s2));
  ASSERT(s2.base == s1.base);   /* the retained region */
  ASSERT_EQ(s2.cached_blocks, 2); /* the closing thread's cache was emptied, the worker's not */
  ASSERT_EQ(s2.blocks_in_use, 0);
  w_run(W_ALLOC_KEEP, MiB);
  w_run(W_ALLOC_KEEP, MiB);
  ASSERT(w_kept[0] != w_kept[1]);
  ASSERT_OK(tl_arena_stats(b, &s2));
  ASSERT_EQ(s2.cache_hits, 0); /* the stale cache was emptied, not served from */
  ASSERT_EQ(s2.cached_blocks, 0);
  ASSERT_EQ(s2.blocks_in_use, 2);
  ASSERT_EQ(s2.bytes_in_use, 2 * MiB);
  memset(w_kept[0], 1, MiB);
  memset(w_kept[1], 2, MiB);
  ASSERT(((unsigned char*)w_kept[0])[MiB - 1] == 1);
  (void)first;
  w_run(W_FREE_KEPT, 0);
  w_stop(t);
  ASSERT_OK(tl_arena_close(b));
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Close and reuse
// ---------------------------------------------------------------------------------------------

TEST_IMPL(arena_close_busy) {
  tl_arena_t* a = arena_new(0, 64 * MiB, TL_ARENA_PIN_NEVER);
  void *p, *q;
  ASSERT_OK(tl_arena_alloc(a, MiB, 0, &p));
  ASSERT_OK(tl_arena_alloc(a, 100, 0, &q));
  ASSERT_EQ(tl_arena_close(a), TL_EBUSY);
  ASSERT_CONTAINS(tl_err_detail(), "2 block(s)");
  ASSERT_OK(tl_arena_free(a, p));
  ASSERT_EQ(tl_arena_close(a), TL_EBUSY); /* still usable after a refused close */
  ASSERT_OK(tl_arena_free(a, q));
  ASSERT_OK(tl_arena_close(a));
  return 0;
}

TEST_IMPL(arena_reuse_region) {
  tl_arena_t* a = arena_new(0, 128 * MiB, TL_ARENA_PIN_NEVER);
  tl_arena_stats_t s1, s2;
  ASSERT_OK(tl_arena_stats(a, &s1));
  void* p;
  ASSERT_OK(tl_arena_alloc(a, MiB, 0, &p));
  ASSERT_OK(tl_arena_free(a, p));
  ASSERT_OK(tl_arena_close(a));

  /* same node, smaller size, same pin state: the retained region, fresh counters */
  a = arena_new(0, 64 * MiB, TL_ARENA_PIN_NEVER);
  ASSERT_OK(tl_arena_stats(a, &s2));
  ASSERT(s2.base == s1.base);
  ASSERT_EQ(s2.size, 128 * MiB);
  ASSERT_EQ(s2.allocs, 0);
  ASSERT_EQ(s2.peak_bytes, 0);
  ASSERT_OK(tl_arena_alloc(a, MiB, 0, &p));
  ASSERT(inside(&s2, p, MiB));

  /* while it is in use, another init reserves a new region */
  tl_arena_t* b = arena_new(0, 64 * MiB, TL_ARENA_PIN_NEVER);
  tl_arena_stats_t s3;
  ASSERT_OK(tl_arena_stats(b, &s3));
  ASSERT(s3.base != s1.base);
  ASSERT_EQ(s3.size, 64 * MiB);
  ASSERT_OK(tl_arena_close(b));
  ASSERT_OK(tl_arena_free(a, p));
  ASSERT_OK(tl_arena_close(a));

  /* the smallest retained region that fits is taken; a larger request needs a new one */
  b = arena_new(0, 10 * MiB, TL_ARENA_PIN_NEVER);
  ASSERT_OK(tl_arena_stats(b, &s2));
  ASSERT(s2.base == s3.base);
  a = arena_new(0, 192 * MiB, TL_ARENA_PIN_NEVER);
  ASSERT_OK(tl_arena_stats(a, &s2));
  ASSERT(s2.base != s1.base && s2.base != s3.base);
  ASSERT_OK(tl_arena_close(a));
  ASSERT_OK(tl_arena_close(b));

  /* a different node (none) does not reuse node 0's region */
  a = arena_new(-1, 64 * MiB, TL_ARENA_PIN_NEVER);
  ASSERT_OK(tl_arena_stats(a, &s2));
  ASSERT(s2.base != s1.base && s2.base != s3.base);
  ASSERT_OK(tl_arena_close(a));
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Pinning
// ---------------------------------------------------------------------------------------------

TEST_IMPL(arena_pin_no_driver) {
  int drv = 0;
  if (tl_cuda_built() && tl_cuda_driver_version(&drv) == 0)
    SKIP("a CUDA driver is installed (version %d)", drv);
  tl_arena_t* a = arena_new(0, 64 * MiB, TL_ARENA_PIN_AUTO);
  ASSERT_EQ(tl_err_detail()[0], '\0'); /* AUTO without a driver is not a failure */
  tl_arena_stats_t s;
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.pinned, 0);
  ASSERT_CONTAINS(s.pin_detail, "not pinned: cudaHostRegister");
  ASSERT_CONTAINS(s.pin_detail, tl_cuda_built() ? "cudaErrorInsufficientDriver"
                                                : "TL_WITH_CUDA=OFF");
  void* p;
  ASSERT_OK(tl_arena_alloc(a, MiB, 0, &p));
  ASSERT_OK(tl_arena_free(a, p));
  ASSERT_OK(tl_arena_close(a));

  tl_arena_options_t o = {.numa_node = 0, .size = 64 * MiB, .pin = TL_ARENA_PIN_REQUIRE};
  a = (tl_arena_t*)&o;
  ASSERT_EQ(tl_arena_init(&a, &o), tl_cuda_built() ? TL_ENODRIVER : TL_ENOSYS);
  ASSERT(a == NULL);
  ASSERT_CONTAINS(tl_err_detail(), "cudaHostRegister");
  /* the unpinned AUTO region is reused by AUTO (same outcome), never by REQUIRE */
  a = arena_new(0, 64 * MiB, TL_ARENA_PIN_AUTO);
  tl_arena_stats_t s2;
  ASSERT_OK(tl_arena_stats(a, &s2));
  ASSERT(s2.base == s.base);
  ASSERT_OK(tl_arena_close(a));
  return 0;
}

/* A fake CUDA runtime whose cudaHostRegister succeeds (or fails) and records its arguments. */
static int fake_reg_rc, fake_reg_calls, fake_unreg_calls;
static void* fake_reg_ptr;
static size_t fake_reg_size;

static int fake_version(int* v) {
  *v = 13000;
  return 0;
}
static int fake_register(void* p, size_t size) {
  fake_reg_calls++;
  fake_reg_ptr = p;
  fake_reg_size = size;
  return fake_reg_rc;
}
static int fake_unregister(void* p) {
  (void)p;
  fake_unreg_calls++;
  return 0;
}
static const char* fake_name(int code) {
  return code == 2 ? "cudaErrorMemoryAllocation" : "cudaErrorFake";
}

static const tl__dev_api_t fake_pin_api = {
    .name = "fake-pin",
    .runtime_version = fake_version,
    .driver_version = fake_version,
    .error_name = fake_name,
    .error_string = fake_name,
    .host_register = fake_register,
    .host_unregister = fake_unregister,
};

TEST_IMPL(arena_pin_fake_backend) {
  tl__cuda_set_api(&fake_pin_api);
  tl_arena_t* a = arena_new(0, 64 * MiB, TL_ARENA_PIN_REQUIRE);
  tl_arena_stats_t s;
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.pinned, 1);
  ASSERT_CONTAINS(s.pin_detail, "pinned: cudaHostRegister");
  ASSERT_EQ(fake_reg_calls, 1);
  ASSERT(fake_reg_ptr == s.base); /* the whole region, once */
  ASSERT_EQ(fake_reg_size, s.size);
  void* p;
  ASSERT_OK(tl_arena_alloc(a, 8 * MiB, 0, &p));
  ASSERT(inside(&s, p, 8 * MiB));
  memset(p, 1, 8 * MiB);
  ASSERT_OK(tl_arena_free(a, p));
  ASSERT_OK(tl_arena_close(a));

  /* the retained pinned region serves AUTO and REQUIRE without registering again, not NEVER */
  a = arena_new(0, 64 * MiB, TL_ARENA_PIN_AUTO);
  tl_arena_stats_t s2;
  ASSERT_OK(tl_arena_stats(a, &s2));
  ASSERT(s2.base == s.base);
  ASSERT_EQ(s2.pinned, 1);
  ASSERT_EQ(fake_reg_calls, 1);
  tl_arena_t* b = arena_new(0, 64 * MiB, TL_ARENA_PIN_NEVER);
  ASSERT_OK(tl_arena_stats(b, &s2));
  ASSERT(s2.base != s.base);
  ASSERT_EQ(s2.pinned, 0);
  ASSERT_EQ(fake_reg_calls, 1);
  ASSERT_OK(tl_arena_close(b));
  ASSERT_OK(tl_arena_close(a));

  /* a failing cudaHostRegister: REQUIRE fails with the CUDA error, AUTO degrades */
  fake_reg_rc = 2;
  tl_arena_options_t o = {.numa_node = 0, .size = 128 * MiB, .pin = TL_ARENA_PIN_REQUIRE};
  ASSERT_EQ(tl_arena_init(&a, &o), TL_ENOMEM); /* cudaErrorMemoryAllocation */
  ASSERT_CONTAINS(tl_err_detail(), "cudaHostRegister: cudaErrorMemoryAllocation (2)");
  ASSERT_EQ(fake_unreg_calls, 0);
  o.pin = TL_ARENA_PIN_AUTO;
  ASSERT_OK(tl_arena_init(&a, &o));
  ASSERT_OK(tl_arena_stats(a, &s2));
  ASSERT_EQ(s2.pinned, 0);
  ASSERT_CONTAINS(s2.pin_detail, "cudaErrorMemoryAllocation");
  ASSERT_OK(tl_arena_close(a));
  ASSERT(tl__cuda_set_api(NULL) == &fake_pin_api);
  return 0;
}

/* On a machine with a GPU: REQUIRE page-locks the region for real (cudaHostRegister). */
TEST_IMPL(gpu_arena_pinned) {
  int n = 0;
  int err = tl_cuda_device_count(&n);
  if (err) SKIP("no GPU: %s (%s)", tl_strerror(err), tl_err_detail());
  tl_arena_t* a = arena_new(-1, 64 * MiB, TL_ARENA_PIN_REQUIRE);
  tl_arena_stats_t s;
  ASSERT_OK(tl_arena_stats(a, &s));
  ASSERT_EQ(s.pinned, 1);
  void* p;
  ASSERT_OK(tl_arena_alloc(a, 8 * MiB, 0, &p));
  memset(p, 0x5a, 8 * MiB);
  ASSERT_OK(tl_arena_free(a, p));
  ASSERT_OK(tl_arena_close(a));
  return 0;
}
