/* numa/arena.c: NUMA-local, optionally page-locked arenas for tensor and batch buffers.
 *
 * Staging buffers must live on the GPU's own NUMA node and be page-locked, or every
 * host-to-device copy crosses the socket interconnect and bounces through the driver's own
 * staging memory. Allocating them one cudaHostAlloc at a time is slow (each call page-locks
 * and maps) and malloc does not know about nodes, so an arena reserves one region up front:
 *
 *   reserve   mmap size + 64 MiB and align the start to 64 MiB, mimalloc's segment alignment
 *             (with merely page alignment the first allocation crashes inside mimalloc 2.0.9);
 *   bind      mbind(MPOL_BIND) to the node BEFORE the first touch, so every page lands there;
 *   touch     only when asked (prefault): write one byte per page, so the region is committed
 *             and placed up front; otherwise each page lands on the node when first written (the
 *             binding is the policy), and a 1 GiB arena costs nothing until it is used;
 *   pin       cudaHostRegister through the CUDA backend table (cudactx/internal.h);
 *   manage    mi_manage_os_memory_ex(exclusive): a mimalloc arena that only heaps created with
 *             mi_heap_new_in_arena(id) allocate from, and that never falls back to the OS.
 *
 * Each thread gets its own mimalloc heap in the arena (created on its first allocation and
 * cached thread-locally by mimalloc arena id), so allocation takes no lock; mimalloc lets any
 * thread free any block. mimalloc 2.0.9 cannot unregister an arena, so a closed arena's region
 * is retained in a process-wide list and reused by a later tl_arena_init() that fits it.
 * Regions therefore live for the process. */
#include <errno.h>
#include <mimalloc.h>
#include <numa.h>
#include <numaif.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "core/internal.h"
#include "cudactx/internal.h"
#include "threadloom/arena.h"

// ---------------------------------------------------------------------------------------------
// Regions: the process-wide list
//
// Invariants (all under tl__regions_lock):
//  - every region on the list is managed by mimalloc (an exclusive arena) and stays mapped,
//    bound and (if pinned) registered until the process exits; nothing is ever removed;
//  - `owned` is 1 while exactly one live tl_arena_t uses the region, 0 while it waits for reuse.
// The fields other than `owned` are written once before the region is published on the list
// and are read-only afterwards, so a tl_arena_t reads them without the lock.
// ---------------------------------------------------------------------------------------------

typedef struct tl__region_s {
  struct tl__region_s* next; /* next region on the list; written under the lock */
  char* start;               /* first byte, aligned to TL_ARENA_GRANULE */
  size_t size;               /* bytes, a multiple of TL_ARENA_GRANULE */
  int numa_node;             /* the node it is bound to, -1 for none */
  int pinned;                /* 1: registered with cudaHostRegister (mimalloc is_large=true) */
  int auto_unpinned;         /* 1: PIN_AUTO tried to pin it and could not (AUTO may reuse it) */
  char pin_detail[192];      /* why it is (not) pinned, copied into the stats */
  mi_arena_id_t mi_id;       /* mimalloc's id for it; keys the per-thread heap cache */
  int owned;                 /* 1 while a tl_arena_t uses it; under the lock */
} tl__region_t;

static pthread_mutex_t tl__regions_lock = PTHREAD_MUTEX_INITIALIZER;
static tl__region_t* tl__regions = NULL; /* head of the list; under the lock */

// ---------------------------------------------------------------------------------------------
// The arena object
// ---------------------------------------------------------------------------------------------

/* Counters that only need a total are split into cache-line-sized shards, one per thread (see
 * tl__shard), so threads allocating at once do not bounce one cache line; a block
 * freed on another thread is subtracted from that thread's shard, so one shard may wrap below
 * zero, but the (unsigned, wrapping) sum over the shards is exact. */
#define TL__SHARDS 128

typedef struct {
  _Alignas(64) _Atomic size_t blocks; /* blocks allocated minus blocks freed on these threads */
  _Atomic size_t bytes;               /* usable bytes allocated minus freed on these threads
                                         (wraps below zero per shard; only the sum means anything) */
  _Atomic uint64_t allocs;            /* successful allocations on these threads */
  _Atomic uint64_t failed;            /* TL_ENOMEM answers on these threads */
} tl__shard_t;

/* Every 2^TL__PEAK_SHIFT allocations a shard samples the total for peak_bytes. */
#define TL__PEAK_SHIFT 6

struct tl_arena_s {
  tl__region_t* region; /* owned (region->owned == 1) until close; read-only fields only */
  /* The counters are _Atomic because any thread allocates and frees on one arena at once. They
   * are sharded per thread so that threads allocating at once share no cache line (one shared
   * counter halved 2-thread throughput for 64 KiB blocks). bytes_in_use is the sum of the
   * shards; peak_bytes is sampled from that sum every 64 allocations of a shard and at every
   * tl_arena_stats call, so it can miss a spike shorter than that.
   *
   * ThreadSanitizer builds also keep `tsan_order`, one shared counter that orders a free before
   * the reuse of its memory: the freeing thread decrements it (release) before mi_free, the
   * allocating thread increments it (acq_rel) after mi_heap_malloc returned the memory
   * (mimalloc's own atomics order the memory itself, but they are not instrumented). */
  _Alignas(64) _Atomic size_t peak_bytes; /* highest sampled sum of the shards' bytes */
#if defined(__SANITIZE_THREAD__)
  _Atomic size_t tsan_order;              /* see above; TSan builds only */
#endif
  tl__shard_t shards[TL__SHARDS];         /* bytes, blocks_in_use, allocs, failed_allocs */
};

#define TL__LIKELY(x) __builtin_expect(!!(x), 1)
#define TL__UNLIKELY(x) __builtin_expect(!!(x), 0)

static _Atomic unsigned tl__next_shard = 0; /* hands out shard slots to threads */

/* Everything threadloom's arenas keep per thread, in one thread-local object: in a shared
 * library every thread-local variable costs a __tls_get_addr call, and alloc and free each
 * reach it once. The heaps are described under "Per-thread heaps" below. */
#define TL__HEAP_SLOTS 128 /* mimalloc 2.0 has at most 64 arenas (ids 1..64) */
typedef struct {
  unsigned shard_slot;              /* this thread's shard slot + 1; 0: none yet */
  mi_heap_t* heaps[TL__HEAP_SLOTS]; /* this thread's heap per mimalloc arena id; NULL: none yet */
  void* anchors[TL__HEAP_SLOTS];    /* per heap, a 1-byte block kept until the thread exits, or
                                       NULL (see "Per-thread heaps") */
} tl__thread_t;
static _Thread_local tl__thread_t tl__thread;

/* &tl__thread, kept in a register: without the empty asm GCC recomputes the address (another
 * __tls_get_addr call) after each call into mimalloc. tl_arena_alloc and tl_arena_free clear
 * the detail text in the same function, so both thread-locals cost one __tls_get_addr. */
static inline tl__thread_t* tl__self(void) {
  tl__thread_t* me = &tl__thread;
  __asm__("" : "+r"(me));
  return me;
}

/* Shard i < TL__SHARDS - 1 belongs to the i-th thread that touched any arena, alone: only that
 * thread writes it, so its counters are updated with a relaxed load and store (no locked
 * instruction), and other threads only read them. Slots are never recycled: the threads after
 * the first TL__SHARDS - 1 share the last shard, which is updated with atomic read-modify-
 * writes. */
static tl__shard_t* tl__shard(tl_arena_t* a, tl__thread_t* me, int* exclusive) {
  if (me->shard_slot == 0)
    me->shard_slot = atomic_fetch_add_explicit(&tl__next_shard, 1, memory_order_relaxed) + 1;
  unsigned i = me->shard_slot - 1;
  *exclusive = i < TL__SHARDS - 1;
  return &a->shards[*exclusive ? i : TL__SHARDS - 1];
}

/* Adds `delta` (two's complement for subtraction) to a shard counter. */
static inline void tl__shard_add(_Atomic size_t* c, size_t delta, int exclusive) {
  if (exclusive)
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + delta, memory_order_relaxed);
  else
    atomic_fetch_add_explicit(c, delta, memory_order_relaxed);
}

/* Adds `delta` to a 64-bit shard counter and returns the new value. */
static inline uint64_t tl__shard_add64(_Atomic uint64_t* c, uint64_t delta, int exclusive) {
  if (exclusive) {
    uint64_t v = atomic_load_explicit(c, memory_order_relaxed) + delta;
    atomic_store_explicit(c, v, memory_order_relaxed);
    return v;
  }
  return atomic_fetch_add_explicit(c, delta, memory_order_relaxed) + delta;
}

typedef struct {
  size_t bytes;    /* sum of the shards' bytes */
  size_t blocks;   /* sum of the shards' blocks */
  uint64_t allocs; /* sum of the shards' allocs */
  uint64_t failed; /* sum of the shards' failed */
} tl__sums_t;

/* Sums the shards that have been handed out: shards at and above tl__next_shard were never
 * written and are zero (a thread takes its slot before it writes the shard, so a caller that
 * synchronised with a writer also sees its slot), which keeps the sum as cheap as the number of
 * threads that ever used an arena rather than TL__SHARDS cache lines. */
static tl__sums_t tl__sum(const tl_arena_t* a) {
  tl__sums_t t = {0, 0, 0, 0};
  unsigned n = atomic_load_explicit(&tl__next_shard, memory_order_relaxed);
  if (n > TL__SHARDS) n = TL__SHARDS;
  for (unsigned i = 0; i < n; i++) {
    t.bytes += atomic_load_explicit(&a->shards[i].bytes, memory_order_relaxed);
    t.blocks += atomic_load_explicit(&a->shards[i].blocks, memory_order_relaxed);
    t.allocs += atomic_load_explicit(&a->shards[i].allocs, memory_order_relaxed);
    t.failed += atomic_load_explicit(&a->shards[i].failed, memory_order_relaxed);
  }
  return t;
}

static void tl__raise_peak(tl_arena_t* a, size_t now) {
  size_t peak = atomic_load_explicit(&a->peak_bytes, memory_order_relaxed);
  while (now > peak && !atomic_compare_exchange_weak_explicit(&a->peak_bytes, &peak, now,
                                                              memory_order_relaxed,
                                                              memory_order_relaxed)) {
  }
}

// ---------------------------------------------------------------------------------------------
// Per-thread heaps
//
// mimalloc heaps allocate only on the thread that created them, so each thread keeps one heap
// per mimalloc arena id in a thread-local table. The heaps belong to the region (its arena
// id), not to a tl_arena_t, so they stay valid when a retained region is reused.
//
// Thread exit: we never delete these heaps ourselves. mimalloc 2.0's thread-exit hook
// (a pthread key destructor set up when the thread's backing heap is initialised, which
// mi_heap_new_in_arena does) runs mi_thread_done -> _mi_heap_done (src/init.c), which walks
// tld->heaps and calls mi_heap_delete on every non-backing heap; mi_heap_delete (src/heap.c)
// moves pages that still hold live blocks to the backing heap, which then abandons them with
// _mi_heap_collect_abandon, so blocks handed to other threads stay valid and can still be
// freed from anywhere. (Read in the 2.0-series mimalloc source; checked by the stress test,
// whose threads exit while others still hold and free their blocks.) The thread-local table
// dies with the thread too, so no dangling heap pointer survives.
//
// Anchors: mimalloc 2.0.9 gives a segment (64 MiB) back to the arena as soon as its last block
// is freed, and the next allocation takes a segment again and clears its ~100 KiB of page
// descriptors. Blocks above 128 KiB have a page each that is freed with them, so a thread that
// allocates and frees one 1 MiB block at a time paid that on every block (measured: 795 ns per
// alloc+free pair in an arena heap, 188 ns with glibc). Each heap therefore allocates one
// 1-byte anchor block when it is created and keeps it until the thread exits, so the thread's
// first segment stays with it; the memory cost is what the arena already budgets per
// allocating thread (one segment). A pthread key destructor frees the anchors at thread exit,
// so an exited thread's segment can go back to the arena once its other blocks are freed.
// ---------------------------------------------------------------------------------------------

static pthread_key_t tl__exit_key;                         /* destructor: tl__thread_exit */
static pthread_once_t tl__exit_once = PTHREAD_ONCE_INIT;
static int tl__exit_key_ok;                                /* written once under tl__exit_once */

/* Frees the calling thread's anchors; runs as the destructor of tl__exit_key at thread exit
 * (the thread's _Thread_local storage is still valid then). */
static void tl__thread_exit(void* arg) {
  tl__thread_t* me = arg;
  for (int i = 0; i < TL__HEAP_SLOTS; i++)
    if (me->anchors[i]) {
      mi_free(me->anchors[i]);
      me->anchors[i] = NULL;
    }
}

static void tl__exit_key_init(void) {
  tl__exit_key_ok = pthread_key_create(&tl__exit_key, tl__thread_exit) == 0;
}

static mi_heap_t* tl__thread_heap(const tl__region_t* r, tl__thread_t* me) {
  int id = (int)r->mi_id;
  if (id < 0 || id >= TL__HEAP_SLOTS) return NULL;
  if (!me->heaps[id]) {
    mi_heap_t* heap = mi_heap_new_in_arena(r->mi_id);
    if (!heap) return NULL;
    me->heaps[id] = heap;
    /* The anchor is an optimisation: without the exit hook, or in a full arena, go without. */
    pthread_once(&tl__exit_once, tl__exit_key_init);
    if (tl__exit_key_ok && pthread_setspecific(tl__exit_key, me) == 0)
      me->anchors[id] = mi_heap_malloc(heap, 1);
  }
  return me->heaps[id];
}

// ---------------------------------------------------------------------------------------------
// Reserving a region
// ---------------------------------------------------------------------------------------------

static int tl__node_check(int node) {
  if (node < 0) return 0;
  if (numa_available() < 0) {
    if (node == 0) return 0; /* a kernel without NUMA has one node: nothing to bind */
    return tl__fail(TL_EINVAL, "arena: NUMA node %d requested but the kernel has no NUMA "
                               "support (use numa_node 0 or -1)", node);
  }
  if (node > numa_max_node() || !numa_bitmask_isbitset(numa_all_nodes_ptr, (unsigned)node))
    return tl__fail(TL_EINVAL, "arena: NUMA node %d is not a node this process may allocate on "
                               "(highest node %d)", node, numa_max_node());
  return 0;
}

static int tl__bind(char* start, size_t size, int node) {
  if (node < 0 || numa_available() < 0) return 0;
  enum { BITS = 8 * sizeof(unsigned long) };
  unsigned long mask[1024 / BITS];
  memset(mask, 0, sizeof mask);
  if (node >= 1024) return tl__fail(TL_EINVAL, "arena: NUMA node %d is out of range", node);
  mask[node / BITS] = 1UL << (node % BITS);
  if (mbind(start, size, MPOL_BIND, mask, 1024 + 1, 0) != 0) {
    int e = errno;
    return tl__fail(e == ENOMEM ? TL_ENOMEM : tl_translate_sys_error(e),
                    "arena: mbind(%zu bytes, MPOL_BIND, node %d): %s", size, node, strerror(e));
  }
  return 0;
}

/* Page-locks the region per `pin`. Returns 0 (pinned or not, *pinned says which, detail in
 * r->pin_detail) or, for PIN_REQUIRE, the translated CUDA error. */
static int tl__pin(tl__region_t* r, tl_arena_pin_t pin) {
  r->pinned = 0;
  if (pin == TL_ARENA_PIN_NEVER) {
    tl__strlcpy(r->pin_detail, "not pinned: TL_ARENA_PIN_NEVER", sizeof r->pin_detail);
    return 0;
  }
  const tl__cuda_api_t* api = tl__cuda_api();
  int err;
  if (!api->host_register || !api->host_unregister)
    err = tl__fail(TL_ENOSYS, "cudaHostRegister: the CUDA backend \"%s\" cannot page-lock",
                   api->name);
  else
    err = tl__cuda_error("cudaHostRegister", api->host_register(r->start, r->size));
  if (err == 0) {
    r->pinned = 1;
    snprintf(r->pin_detail, sizeof r->pin_detail, "pinned: cudaHostRegister(%zu bytes)",
             r->size);
    return 0;
  }
  snprintf(r->pin_detail, sizeof r->pin_detail, "not pinned: %s", tl_err_detail());
  if (pin == TL_ARENA_PIN_REQUIRE) return err;
  r->auto_unpinned = 1;
  tl__clear_detail(); /* AUTO succeeded without pinning: the reason lives in the stats */
  return 0;
}

static int tl__region_new(tl__region_t** out, int node, size_t size, tl_arena_pin_t pin,
                          int prefault) {
  tl__region_t* r = calloc(1, sizeof *r);
  if (!r) return tl__fail(TL_ENOMEM, "arena: %zu bytes for the region record", sizeof *r);
  size_t span = size + TL_ARENA_GRANULE;
  char* raw = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) {
    int e = errno;
    free(r);
    return tl__fail(TL_ENOMEM, "arena: mmap(%zu bytes): %s", span, strerror(e));
  }
  /* Keep only the aligned part: [start, start + size). */
  char* start = (char*)(((uintptr_t)raw + TL_ARENA_GRANULE - 1) & ~(uintptr_t)(TL_ARENA_GRANULE - 1));
  if (start > raw) munmap(raw, (size_t)(start - raw));
  size_t tail = (size_t)(raw + span - (start + size));
  if (tail) munmap(start + size, tail);
  r->start = start;
  r->size = size;
  r->numa_node = node;

  int err = tl__bind(start, size, node);
  if (err) goto fail_unmap;
  if (prefault) { /* first touch, after binding: every page is placed on the node now */
    long pg = sysconf(_SC_PAGESIZE);
    size_t page = pg > 0 ? (size_t)pg : 4096;
    for (size_t off = 0; off < size; off += page) ((volatile char*)start)[off] = 0;
  }

  if ((err = tl__pin(r, pin)) != 0) goto fail_unmap;
  /* is_large = pinned keeps mimalloc from decommitting (madvise) page-locked memory; the
   * region is zero (fresh anonymous pages, untouched or touched with zeros). */
  if (!mi_manage_os_memory_ex(start, size, true, r->pinned != 0, true, node, true, &r->mi_id)) {
    err = tl__fail(TL_ENOMEM, "arena: mimalloc refused the region (mi_manage_os_memory_ex, "
                              "%zu bytes; mimalloc 2.0 manages at most 64 arenas per process)",
                   size);
    goto fail_unpin;
  }
  *out = r;
  return 0;

fail_unpin:
  if (r->pinned) tl__cuda_api()->host_unregister(start);
fail_unmap:
  munmap(start, size);
  free(r);
  return err;
}

// ---------------------------------------------------------------------------------------------
// Init / close
// ---------------------------------------------------------------------------------------------

static int tl__pin_compatible(const tl__region_t* r, tl_arena_pin_t pin) {
  switch (pin) {
    case TL_ARENA_PIN_NEVER: return !r->pinned;
    case TL_ARENA_PIN_REQUIRE: return r->pinned;
    case TL_ARENA_PIN_AUTO: return r->pinned || r->auto_unpinned;
  }
  return 0;
}

/* Takes the smallest retained region that fits; NULL if none. Under the lock. */
static tl__region_t* tl__region_take(int node, size_t size, tl_arena_pin_t pin) {
  tl__region_t* best = NULL;
  for (tl__region_t* r = tl__regions; r; r = r->next)
    if (!r->owned && r->numa_node == node && r->size >= size && tl__pin_compatible(r, pin) &&
        (!best || r->size < best->size))
      best = r;
  if (best) best->owned = 1;
  return best;
}

int tl_arena_init(tl_arena_t** out, const tl_arena_options_t* opts) {
  tl__clear_detail();
  if (out) *out = NULL;
  if (!out || !opts) return tl__fail(TL_EINVAL, "tl_arena_init: NULL argument");
  if (opts->size == 0) return tl__fail(TL_EINVAL, "tl_arena_init: size is 0");
  if (opts->size > SIZE_MAX / 4)
    return tl__fail(TL_EINVAL, "tl_arena_init: size %zu is too large", opts->size);
  if (opts->pin != TL_ARENA_PIN_AUTO && opts->pin != TL_ARENA_PIN_NEVER &&
      opts->pin != TL_ARENA_PIN_REQUIRE)
    return tl__fail(TL_EINVAL, "tl_arena_init: pin %d is not a tl_arena_pin_t", (int)opts->pin);
  int node = opts->numa_node < 0 ? -1 : opts->numa_node;
  int err = tl__node_check(node);
  if (err) return err;
  size_t size = (opts->size + TL_ARENA_GRANULE - 1) & ~(TL_ARENA_GRANULE - 1);

  tl_arena_t* a = aligned_alloc(64, sizeof *a);
  if (a) memset(a, 0, sizeof *a); /* all-zero atomics are valid zero counters */
  if (!a) return tl__fail(TL_ENOMEM, "arena: %zu bytes for the arena object", sizeof *a);

  /* The lock is held while a new region is reserved: inits are rare, and it keeps two threads
   * from both reserving where one region would do. */
  pthread_mutex_lock(&tl__regions_lock);
  tl__region_t* r = tl__region_take(node, size, opts->pin);
  if (!r) {
    err = tl__region_new(&r, node, size, opts->pin, opts->prefault);
    if (err == 0) {
      r->owned = 1;
      r->next = tl__regions;
      tl__regions = r;
    }
  }
  pthread_mutex_unlock(&tl__regions_lock);
  if (err) {
    free(a);
    return err;
  }
  a->region = r;
  *out = a;
  return 0;
}

int tl_arena_close(tl_arena_t* a) {
  tl__clear_detail();
  if (!a) return 0;
  tl__sums_t t = tl__sum(a);
  if (t.blocks != 0)
    return tl__fail(TL_EBUSY, "arena on node %d: %zu block(s), %zu bytes still in use; free "
                              "them before closing",
                    a->region->numa_node, t.blocks, t.bytes);
  pthread_mutex_lock(&tl__regions_lock);
  a->region->owned = 0;
  pthread_mutex_unlock(&tl__regions_lock);
  free(a);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Alloc / free
// ---------------------------------------------------------------------------------------------

static int tl__in_region(const tl__region_t* r, const void* p) {
  uintptr_t u = (uintptr_t)p, s = (uintptr_t)r->start;
  return u >= s && u < s + r->size;
}

static __attribute__((cold)) int tl__exhausted(tl_arena_t* a, size_t size, const char* why) {
  int ex;
  tl__shard_t* sh = tl__shard(a, &tl__thread, &ex);
  tl__shard_add64(&sh->failed, 1, ex);
  const tl__region_t* r = a->region;
  tl__sums_t t = tl__sum(a);
  return tl__fail(TL_ENOMEM,
                  "arena on node %d (%zu MiB%s) cannot serve %zu bytes%s: %zu bytes in %zu "
                  "block(s) in use; free blocks or create a larger arena (mimalloc gives each "
                  "allocating thread segments of its own: allow 64 MiB per allocating thread)",
                  r->numa_node, r->size >> 20, r->pinned ? ", pinned" : "", size, why,
                  t.bytes, t.blocks);
}

/* Whether mimalloc 2.0.9 places a plain block of `size` bytes at a multiple of `alignment`
 * anyway, so that mi_heap_malloc can serve an aligned request. mi_heap_malloc_aligned does not
 * know this: for an alignment above 16 it takes the plain path only for sizes up to 128 bytes
 * that are multiples of the alignment, and otherwise allocates size + alignment - 1 bytes, which
 * for a 64 KiB block means the 80 KiB size class and a slower path (measured on the 2-core VM:
 * 43 instead of 24 ns per alloc+free pair, the largest part of the arena's gap). Every block is 16-byte aligned (MI_MAX_ALIGN_SIZE); size classes above 224 bytes
 * are multiples of 64 bytes on pages that start at a multiple of 64 bytes; blocks above 128 KiB
 * (large pages) each start a page, on a 64 KiB slice boundary. The caller checks the address
 * all the same, so a mimalloc that places blocks differently costs a retry, never a misaligned
 * block. */
static inline int tl__plain_aligns(size_t size, size_t alignment) {
  return alignment <= 16 || (alignment <= 64 && size > 224) ||
         (alignment <= ((size_t)64 << 10) && size > ((size_t)128 << 10));
}

/* One attempt at a block of `size` bytes aligned to `alignment` from `heap`; NULL when the
 * arena has no room. */
static inline void* tl__heap_alloc(mi_heap_t* heap, size_t size, size_t alignment) {
  if (tl__plain_aligns(size, alignment)) {
    void* p = mi_heap_malloc(heap, size);
    if (!p || ((uintptr_t)p & (alignment - 1)) == 0) return p;
    mi_free(p); /* first, so the aligned attempt below has the room back */
  }
  return mi_heap_malloc_aligned(heap, size, alignment);
}

/* The rare paths of tl_arena_alloc, out of line so that the common one stays short: the
 * thread's first allocation in this region (its heap is created here), a request larger than
 * the region, an arena that looked full (collect, retry, else TL_ENOMEM) and a block outside the
 * region. `*p` comes in as the fast path's block (non-NULL only when it lies outside the
 * region) and goes out as the block, or NULL with the error returned. */
static __attribute__((noinline, cold)) int tl__alloc_slow(tl_arena_t* a, tl__thread_t* me,
                                                          size_t size, size_t alignment,
                                                          void** p) {
  const tl__region_t* r = a->region;
  if (*p) goto outside;
  if (size > r->size) return tl__exhausted(a, size, " (larger than the region)");
  mi_heap_t* heap = tl__thread_heap(r, me);
  if (!heap)
    return tl__fail(TL_ENOMEM, "arena: no mimalloc heap for this thread (arena id %d)",
                    (int)r->mi_id);
  *p = tl__heap_alloc(heap, size, alignment);
  if (!*p) {
    /* Blocks freed by other threads, and segments abandoned by threads that exited, go back to
     * the arena only when collected: collect once, then retry. */
    mi_heap_collect(heap, true);
    *p = tl__heap_alloc(heap, size, alignment);
  }
  unsigned id = (unsigned)r->mi_id;
  if (!*p && me->anchors[id]) {
    /* The anchor keeps a segment this request may need (a block above 32 MiB takes a segment
     * of its own): give it up for good, collect the emptied page, retry. */
    mi_free(me->anchors[id]);
    me->anchors[id] = NULL;
    mi_heap_collect(heap, true);
    *p = tl__heap_alloc(heap, size, alignment);
  }
  if (!*p) return tl__exhausted(a, size, "");
  if (tl__in_region(r, *p)) return 0;
outside:
  /* mimalloc 2.0.9 answers NULL when an exclusive arena is full (checked); should a version
   * fall back to the OS instead, the block is not ours to hand out. */
  mi_free(*p);
  *p = NULL;
  return tl__exhausted(a, size, " (mimalloc offered memory outside the region)");
}

/* The argument errors of tl_arena_alloc, out of line like tl__alloc_slow. */
static __attribute__((noinline, cold)) int tl__alloc_invalid(const tl_arena_t* a, size_t size,
                                                             size_t alignment, void** out) {
  if (!a || !out) return tl__fail(TL_EINVAL, "tl_arena_alloc: NULL argument");
  if (size == 0) return tl__fail(TL_EINVAL, "tl_arena_alloc: size is 0");
  return tl__fail(TL_EINVAL, "tl_arena_alloc: alignment %zu is not a power of two up to %zu",
                  alignment, TL_ARENA_MAX_ALIGNMENT);
}

int tl_arena_alloc(tl_arena_t* a, size_t size, size_t alignment, void** out) {
  tl__thread_t* me = tl__self();
  tl__detail[0] = '\0'; /* tl__clear_detail(), inline: see tl__self */
  if (out) *out = NULL;
  if (TL__UNLIKELY(!a || !out || size == 0 || (alignment & (alignment - 1)) != 0 ||
                   alignment > TL_ARENA_MAX_ALIGNMENT))
    return tl__alloc_invalid(a, size, alignment, out);
  if (alignment == 0) alignment = 64;
  const tl__region_t* r = a->region;
#if defined(__SANITIZE_THREAD__)
  (void)atomic_load_explicit(&a->tsan_order, memory_order_acquire); /* every earlier free */
#endif
  /* The common path: this thread's heap exists and has room. */
  unsigned id = (unsigned)r->mi_id;
  mi_heap_t* heap = id < TL__HEAP_SLOTS ? me->heaps[id] : NULL;
  void* p = NULL;
  if (TL__LIKELY(heap != NULL && size <= r->size)) p = tl__heap_alloc(heap, size, alignment);
  if (TL__UNLIKELY(!p || !tl__in_region(r, p))) {
    int err = tl__alloc_slow(a, me, size, alignment, &p);
    if (err) return err;
  }
  size_t usable = mi_usable_size(p);
#if defined(__SANITIZE_THREAD__)
  atomic_fetch_add_explicit(&a->tsan_order, usable, memory_order_acq_rel);
#endif
  int ex;
  tl__shard_t* sh = tl__shard(a, me, &ex);
  tl__shard_add(&sh->bytes, usable, ex);
  tl__shard_add(&sh->blocks, 1, ex);
  uint64_t allocs = tl__shard_add64(&sh->allocs, 1, ex);
  if (TL__UNLIKELY((allocs & ((1u << TL__PEAK_SHIFT) - 1)) == 0))
    tl__raise_peak(a, tl__sum(a).bytes);
  *out = p;
  return 0;
}

int tl_arena_free(tl_arena_t* a, void* p) {
  tl__thread_t* me = tl__self();
  tl__detail[0] = '\0'; /* tl__clear_detail(), inline: see tl__self */
  if (TL__UNLIKELY(!a || !p)) return tl__fail(TL_EINVAL, "tl_arena_free: NULL argument");
  if (TL__UNLIKELY(!tl__in_region(a->region, p)))
    return tl__fail(TL_EINVAL, "tl_arena_free: %p is not inside this arena's region", p);
  size_t usable = mi_usable_size(p);
  /* Counters first, then mi_free: see the comment on struct tl_arena_s. */
  int ex;
  tl__shard_t* sh = tl__shard(a, me, &ex);
  tl__shard_add(&sh->bytes, (size_t)0 - usable, ex);
  tl__shard_add(&sh->blocks, (size_t)0 - 1, ex);
#if defined(__SANITIZE_THREAD__)
  atomic_fetch_sub_explicit(&a->tsan_order, usable, memory_order_release);
#endif
  mi_free(p);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Stats and diagnostics
// ---------------------------------------------------------------------------------------------

int tl_arena_stats(const tl_arena_t* a, tl_arena_stats_t* out) {
  tl__clear_detail();
  if (!a || !out) return tl__fail(TL_EINVAL, "tl_arena_stats: NULL argument");
  memset(out, 0, sizeof *out);
  const tl__region_t* r = a->region;
  out->base = r->start;
  out->numa_node = r->numa_node;
  out->size = r->size;
  out->pinned = r->pinned;
  tl__strlcpy(out->pin_detail, r->pin_detail, sizeof out->pin_detail);
  tl__sums_t t = tl__sum(a);
  out->bytes_in_use = t.bytes;
  tl__raise_peak((tl_arena_t*)a, t.bytes); /* the peak counter is the one field stats updates */
  out->blocks_in_use = t.blocks;
  out->peak_bytes = atomic_load(&a->peak_bytes);
  out->allocs = t.allocs;
  out->failed_allocs = t.failed;
  return 0;
}

int tl_arena_node_of(const void* p, int* node) {
  tl__clear_detail();
  if (!p || !node) return tl__fail(TL_EINVAL, "tl_arena_node_of: NULL argument");
  *node = -1;
  long pg = sysconf(_SC_PAGESIZE);
  uintptr_t page = (uintptr_t)p & ~(uintptr_t)((pg > 0 ? pg : 4096) - 1);
  void* pages[1] = {(void*)page};
  int status[1] = {-1};
  if (move_pages(0, 1, pages, NULL, status, 0) != 0) {
    int e = errno;
    return tl__fail(e == ENOSYS ? TL_ENOSYS : tl_translate_sys_error(e),
                    "tl_arena_node_of: move_pages(%p): %s", p, strerror(e));
  }
  if (status[0] < 0)
    return tl__fail(status[0] == -ENOENT || status[0] == -EFAULT
                        ? TL_ENOENT
                        : tl_translate_sys_error(-status[0]),
                    "tl_arena_node_of: page of %p: %s", p, strerror(-status[0]));
  *node = status[0];
  return 0;
}
