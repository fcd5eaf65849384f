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
 *   pin       cudaHostRegister through the CUDA backend table (cudactx/internal.h), or the sim
 *             backend's host_register when simulated devices are selected (pinned bandwidth);
 *   manage    mi_manage_os_memory_ex(exclusive): a mimalloc arena that only heaps created with
 *             mi_heap_new_in_arena(id) allocate from, and that never falls back to the OS.
 *
 * Each thread gets its own mimalloc heap in the arena (created on its first allocation and
 * cached thread-locally by mimalloc arena id), so allocation takes no lock; mimalloc lets any
 * thread free any block. mimalloc 2.0.9 cannot unregister an arena, so a closed arena's region
 * is retained in a process-wide list and reused by a later tl_arena_init() that fits it.
 * Regions therefore live for the process.
 *
 * In front of mimalloc each thread keeps a small cache of freed blocks per region ("Per-thread
 * block caches" below): mimalloc 2.0.9's path for blocks of 64 KiB and more is slower than
 * glibc's free lists, and a loader thread frees and allocates blocks of one size over and over. */
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
#include "numa/internal.h"
#include "threadloom/arena.h"

// ---------------------------------------------------------------------------------------------
// Regions: the process-wide list
//
// Invariants:
//  - every region on the list is managed by mimalloc (an exclusive arena) and stays mapped,
//    bound and (if pinned) registered until the process exits; nothing is ever removed (the
//    list and `next`: under tl__regions_lock);
//  - `owned` is 1 while exactly one live tl_arena_t uses the region, 0 while it waits for reuse
//    (under tl__regions_lock);
//  - `caches` lists the block caches of the threads that allocated in the region and have not
//    exited: a cache is linked before its thread first uses it and unlinked at thread exit
//    (under tl__caches_lock, a lock of its own so that a thread's first allocation, its exit
//    and tl_arena_stats never wait for another arena's init, which holds tl__regions_lock while
//    it reserves and may prefault or pin a region). The two locks are never held together.
// The fields other than `owned`, `caches` and the atomics are written once before the region is
// published on the list and are read-only afterwards, so a tl_arena_t reads them without a
// lock.
// ---------------------------------------------------------------------------------------------

typedef struct tl__region_s {
  /* The first four fields are read by every alloc and free: they share one cache line (the
   * record is 64-byte aligned), which trim_epoch's rare bumps invalidate. */
  _Alignas(64) char* start;  /* first byte, aligned to TL_ARENA_GRANULE */
  size_t size;               /* bytes, a multiple of TL_ARENA_GRANULE */
  mi_arena_id_t mi_id;       /* mimalloc's id for it; keys the per-thread heaps and caches */
  _Atomic unsigned trim_epoch; /* bumped to ask every thread to empty its cache of this region
                                  (tl_arena_trim, tl_arena_close, an allocation that failed);
                                  _Atomic: any thread bumps it, every cache reads it */
  struct tl__region_s* next; /* next region on the list; written under tl__regions_lock */
  int numa_node;             /* the node it is bound to, -1 for none */
  int pinned;                /* 1: registered with cudaHostRegister (mimalloc is_large=true) */
  const struct tl__dev_api_s* pin_api; /* the table that registered it (CUDA's, or the sim's) */
  int auto_unpinned;         /* 1: PIN_AUTO tried to pin it and could not (AUTO may reuse it) */
  char pin_detail[192];      /* why it is (not) pinned, copied into the stats */
  int owned;                 /* 1 while a tl_arena_t uses it; under tl__regions_lock */
  struct tl__cache_s* caches; /* the threads' block caches of this region (a list through
                                 tl__cache_t.next); under tl__caches_lock */
#if defined(__SANITIZE_THREAD__)
  _Atomic size_t tsan_order; /* orders a mi_free before the reuse of the memory, see
                                struct tl_arena_s; TSan builds only */
#endif
} tl__region_t;

static pthread_mutex_t tl__regions_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t tl__caches_lock = PTHREAD_MUTEX_INITIALIZER; /* every region's `caches` */
static tl__region_t* tl__regions = NULL; /* head of the list; under tl__regions_lock */

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
  _Atomic uint64_t hits;              /* allocations served by these threads' block caches */
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
   * ThreadSanitizer builds also keep the region's `tsan_order`, one shared counter that orders
   * a free before the reuse of its memory: a thread that hands a block to mi_free (tl_arena_free,
   * or a cache eviction or flush) decrements it (release) first, the allocating thread
   * increments it (acq_rel) after mi_heap_malloc returned the memory (mimalloc's own atomics
   * order the memory itself, but they are not instrumented). A block that a thread's cache
   * serves needs none: only that thread put it there, so its free comes before the reuse in
   * program order, and whoever else used the block before synchronised with that free. */
  _Alignas(64) _Atomic size_t peak_bytes; /* highest sampled sum of the shards' bytes */
  tl__shard_t shards[TL__SHARDS];         /* bytes, blocks_in_use, allocs, failed_allocs, hits */
};

#define TL__LIKELY(x) __builtin_expect(!!(x), 1)
#define TL__UNLIKELY(x) __builtin_expect(!!(x), 0)

static _Atomic unsigned tl__next_shard = 0; /* slots handed out so far: never handed out are
                                                zero in every arena (see tl__sum) */
/* Exclusive slots of exited threads, handed to the next threads that need one (tl__take_slot,
 * tl__thread_exit; under tl__slots_lock, whose release/acquire also orders the exited thread's
 * last plain stores before the next owner's first). Without recycling, a process that creates
 * threads over time (a loader's workers every epoch) ran out of the TL__SHARDS - 1 exclusive
 * slots and every later thread updated the one shared shard: 64 KiB blocks at 0.35x glibc's
 * rate with 2 threads, 1.0x with their own slots. */
static pthread_mutex_t tl__slots_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned tl__free_slots[TL__SHARDS];
static unsigned tl__nfree_slots;

/* Everything threadloom's arenas keep per thread, in one thread-local object: in a shared
 * library every thread-local variable costs a __tls_get_addr call, and alloc and free each
 * reach it once. The heaps are described under "Per-thread heaps" below. */
#define TL__HEAP_SLOTS 128 /* mimalloc 2.0 has at most 64 arenas (ids 1..64) */
typedef struct {
  unsigned shard_slot;              /* this thread's shard slot + 1; 0: none yet */
  struct tl__cache_s* caches[TL__HEAP_SLOTS]; /* per heap, this thread's block cache, or NULL
                                                 (see "Per-thread block caches"); next to
                                                 shard_slot: a cache hit reads both */
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

static int tl__watch_exit(tl__thread_t* me); /* "Per-thread heaps": arms tl__thread_exit */

/* Shard i < TL__SHARDS - 1 belongs to one live thread at a time, alone: only that thread writes
 * it, so its counters are updated with a relaxed load and store (no locked instruction), and
 * other threads only read them. A thread takes a slot on its first allocation or free in any
 * arena and gives it back at exit (tl__thread_exit), so the exclusive slots run out only with
 * more than TL__SHARDS - 1 such threads alive at once; past that, threads share the last
 * shard, which is updated with atomic read-modify-writes. A recycled slot keeps its counts:
 * they are part of the sums (blocks the exited thread left allocated). */
static void tl__take_slot(tl__thread_t* me) {
  unsigned slot = 0;
  (void)tl__watch_exit(me); /* without the exit hook (no key) the slot never comes back */
  pthread_mutex_lock(&tl__slots_lock);
  if (tl__nfree_slots > 0) slot = tl__free_slots[--tl__nfree_slots] + 1;
  pthread_mutex_unlock(&tl__slots_lock);
  if (!slot) slot = atomic_fetch_add_explicit(&tl__next_shard, 1, memory_order_relaxed) + 1;
  me->shard_slot = slot;
}

static tl__shard_t* tl__shard(tl_arena_t* a, tl__thread_t* me, int* exclusive) {
  if (TL__UNLIKELY(me->shard_slot == 0)) tl__take_slot(me);
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
  uint64_t hits;   /* sum of the shards' hits */
} tl__sums_t;

/* Sums the shards that have been handed out: shards at and above tl__next_shard were never
 * written and are zero (a thread takes its slot before it writes the shard, so a caller that
 * synchronised with a writer also sees its slot), which keeps the sum as cheap as the number of
 * threads that ever used an arena rather than TL__SHARDS cache lines. */
static tl__sums_t tl__sum(const tl_arena_t* a) {
  tl__sums_t t = {0, 0, 0, 0, 0};
  unsigned n = atomic_load_explicit(&tl__next_shard, memory_order_relaxed);
  if (n > TL__SHARDS) n = TL__SHARDS;
  for (unsigned i = 0; i < n; i++) {
    t.bytes += atomic_load_explicit(&a->shards[i].bytes, memory_order_relaxed);
    t.blocks += atomic_load_explicit(&a->shards[i].blocks, memory_order_relaxed);
    t.allocs += atomic_load_explicit(&a->shards[i].allocs, memory_order_relaxed);
    t.failed += atomic_load_explicit(&a->shards[i].failed, memory_order_relaxed);
    t.hits += atomic_load_explicit(&a->shards[i].hits, memory_order_relaxed);
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
// Per-thread block caches
//
// mimalloc 2.0.9 serves blocks above 128 KiB from a page of their own and frees that page with
// the block, and its medium pages (64 KiB blocks) cost more than glibc's free lists, so a
// loader thread that allocates and frees blocks of one size ran at 0.6-1.0x glibc. Each thread
// that allocates in a region therefore keeps a small LIFO cache of blocks it freed, and
// tl_arena_alloc takes a block from it before asking mimalloc:
//
//  - Owner only: a cache is read and written by its own thread alone (stats read its two
//    atomic totals under tl__caches_lock), so taking and putting take no lock and no locked
//    instruction. Other threads never touch its blocks; they can only ask it to empty itself
//    (trim_epoch, below). A block is therefore in exactly one place: handed out to a caller,
//    in one cache, or back in mimalloc.
//  - Who caches: a thread caches a block it frees (whichever thread allocated it: the memory is
//    shared, and mimalloc's cross-thread free handles it when the cache gives it back) only if
//    it has a heap in the region, i.e. it allocates there too. A thread that only frees (a
//    consumer) frees straight to mimalloc, so its cache cannot sit on blocks it never reuses.
//  - Match: a cached block serves a request when its usable size equals the usable size
//    mimalloc gave this thread the last time it allocated the same (size, alignment) (a small
//    memo per cache; mi_good_size does not predict mimalloc's large pages: 200 KiB gets 256 KiB)
//    and its address satisfies the alignment. So a hit hands out exactly the block mimalloc
//    would have, and bytes_in_use stays exact.
//  - Bounds: at most TL__CACHE_BLOCKS blocks and region size / TL__CACHE_SHARE bytes per thread
//    and region; putting a block into a full cache gives the oldest back to mimalloc first, and
//    a block larger than the byte bound is never cached.
//  - Emptying: at thread exit (the tl__exit_key destructor), on the calling thread by
//    tl_arena_trim, tl_arena_close and an allocation that found the region full (before it
//    retries), and on every other thread at its next tl_arena_alloc or tl_arena_free in the
//    region after one of those bumped the region's trim_epoch. So an allocation can fail while
//    other threads' caches hold up to TL__CACHE_BLOCKS blocks and size / TL__CACHE_SHARE bytes
//    each; the next allocation after those threads called into the arena again (or exited)
//    finds that memory back in mimalloc (a block freed by another thread returns to the heap
//    that allocated it: see the design notes).
//  - Regions outlive arenas: a cache belongs to (thread, region), like the heap, so a retained
//    region reused by a new tl_arena_t finds the caches that survived; tl_arena_close bumps the
//    epoch, so they are emptied at each thread's next call, and a cached block is never counted
//    as in use by either arena (blocks_in_use counts blocks handed out; the cached blocks and
//    bytes are reported separately).
// ---------------------------------------------------------------------------------------------

#define TL__CACHE_BLOCKS 8 /* blocks per thread and region */
#define TL__CACHE_SHARE 16 /* bytes per thread and region: at most the region's size / this */
#define TL__CACHE_MEMO 4   /* (size, alignment) -> usable pairs remembered per cache */

/* The fields a hit reads come first: the header and the newest memo entry share the first
 * cache line (the record is 64-byte aligned), the blocks follow. */
typedef struct tl__cache_s {
  _Alignas(64) tl__region_t* region; /* the region its blocks lie in; read-only */
  unsigned epoch;            /* region->trim_epoch when last emptied; owner only */
  unsigned count;            /* blocks in `block`; owner only */
  _Atomic size_t bytes;      /* usable bytes of the cached blocks: written by the owner
                                (relaxed store), read by tl_arena_stats under tl__caches_lock */
  _Atomic size_t blocks;     /* == count, for tl_arena_stats, like `bytes` */
  struct {
    size_t size, alignment; /* a request this thread sent to mimalloc */
    size_t usable;          /* what mimalloc's block for it held; 0: empty entry */
  } memo[TL__CACHE_MEMO];   /* owner only; [0] the most recent */
  struct {
    void* p;       /* the block */
    size_t usable; /* its mi_usable_size */
  } block[TL__CACHE_BLOCKS]; /* [0] oldest .. [count - 1] newest; owner only */
  size_t max_bytes;          /* region size / TL__CACHE_SHARE; read-only */
  struct tl__cache_s* next;  /* next cache of the region; under tl__caches_lock */
} tl__cache_t;

/* Hands one cached block back to mimalloc (the caller removes it from the cache). */
static void tl__cache_release(tl__cache_t* c, void* p) {
#if defined(__SANITIZE_THREAD__)
  atomic_fetch_sub_explicit(&c->region->tsan_order, 1, memory_order_release);
#else
  (void)c;
#endif
  mi_free(p);
}

static void tl__cache_publish(tl__cache_t* c, size_t bytes) {
  atomic_store_explicit(&c->bytes, bytes, memory_order_relaxed);
  atomic_store_explicit(&c->blocks, c->count, memory_order_relaxed);
}

/* Gives every cached block back to mimalloc and catches up with the region's trim_epoch. */
static void tl__cache_empty(tl__cache_t* c) {
  c->epoch = atomic_load_explicit(&c->region->trim_epoch, memory_order_relaxed);
  for (unsigned i = 0; i < c->count; i++) tl__cache_release(c, c->block[i].p);
  c->count = 0;
  tl__cache_publish(c, 0);
}

/* Empties the cache if another thread asked for it since it was last emptied. */
static inline void tl__cache_check_epoch(tl__cache_t* c) {
  if (TL__UNLIKELY(c->epoch != atomic_load_explicit(&c->region->trim_epoch, memory_order_relaxed)))
    tl__cache_empty(c);
}

/* Asks every thread's cache of `r` to empty itself at its next call. */
static void tl__cache_request_trim(tl__region_t* r) {
  atomic_fetch_add_explicit(&r->trim_epoch, 1, memory_order_relaxed);
}

/* The usable size mimalloc gave this thread for (size, alignment), 0 if not remembered. */
static inline size_t tl__cache_memo_get(const tl__cache_t* c, size_t size, size_t alignment) {
  for (unsigned i = 0; i < TL__CACHE_MEMO; i++)
    if (c->memo[i].size == size && c->memo[i].alignment == alignment) return c->memo[i].usable;
  return 0;
}

/* Remembers (size, alignment) -> usable as the most recent entry, forgetting the oldest. */
static void tl__cache_memo_put(tl__cache_t* c, size_t size, size_t alignment, size_t usable) {
  if (c->memo[0].size == size && c->memo[0].alignment == alignment && c->memo[0].usable == usable)
    return;
  unsigned i = 0; /* the entry to drop: this request's older one, else the oldest */
  while (i < TL__CACHE_MEMO - 1 && !(c->memo[i].size == size && c->memo[i].alignment == alignment))
    i++;
  for (; i > 0; i--) c->memo[i] = c->memo[i - 1];
  c->memo[0].size = size;
  c->memo[0].alignment = alignment;
  c->memo[0].usable = usable;
}

/* Takes the newest cached block that matches (see the top of this section), or NULL; stores
 * its usable size in *usable. The cache is not empty. */
static inline void* tl__cache_take(tl__cache_t* c, size_t size, size_t alignment,
                                   size_t* usable) {
  tl__cache_check_epoch(c);
  size_t want = tl__cache_memo_get(c, size, alignment);
  if (!want) return NULL;
  for (unsigned i = c->count; i-- > 0;) {
    void* p = c->block[i].p;
    if (c->block[i].usable != want || ((uintptr_t)p & (alignment - 1)) != 0) continue;
    size_t bytes = atomic_load_explicit(&c->bytes, memory_order_relaxed) - want;
    for (unsigned j = i + 1; j < c->count; j++) c->block[j - 1] = c->block[j];
    c->count--;
    tl__cache_publish(c, bytes);
    *usable = want;
    return p;
  }
  return NULL;
}

/* Puts a block this thread frees into its cache, first giving the oldest blocks back to
 * mimalloc while the cache is full; 0 (not cached) for a block above the byte bound. */
static inline int tl__cache_put(tl__cache_t* c, void* p, size_t usable) {
  tl__cache_check_epoch(c);
  if (usable > c->max_bytes) return 0;
  size_t bytes = atomic_load_explicit(&c->bytes, memory_order_relaxed);
  unsigned drop = 0;
  while (c->count - drop == TL__CACHE_BLOCKS || bytes + usable > c->max_bytes) {
    tl__cache_release(c, c->block[drop].p);
    bytes -= c->block[drop].usable;
    drop++;
  }
  if (drop) {
    for (unsigned j = drop; j < c->count; j++) c->block[j - drop] = c->block[j];
    c->count -= drop;
  }
  c->block[c->count].p = p;
  c->block[c->count].usable = usable;
  c->count++;
  tl__cache_publish(c, bytes + usable);
  return 1;
}

/* A new empty cache for the calling thread, linked into r->caches; NULL without memory. */
static tl__cache_t* tl__cache_new(tl__region_t* r) {
  tl__cache_t* c = aligned_alloc(64, sizeof *c); /* sizeof is a multiple of 64 (_Alignas) */
  if (!c) return NULL;
  memset(c, 0, sizeof *c); /* all-zero atomics are valid zeros */
  c->region = r;
  c->max_bytes = r->size / TL__CACHE_SHARE;
  c->epoch = atomic_load_explicit(&r->trim_epoch, memory_order_relaxed);
  pthread_mutex_lock(&tl__caches_lock);
  c->next = r->caches;
  r->caches = c;
  pthread_mutex_unlock(&tl__caches_lock);
  return c;
}

/* Empties the calling thread's cache, unlinks it from its region and frees it. */
static void tl__cache_delete(tl__cache_t* c) {
  tl__cache_empty(c);
  pthread_mutex_lock(&tl__caches_lock);
  tl__cache_t** link = &c->region->caches;
  while (*link != c) link = &(*link)->next;
  *link = c->next;
  pthread_mutex_unlock(&tl__caches_lock);
  free(c);
}

/* Sums the cached blocks and bytes of all threads' caches of `r`. */
static void tl__cache_totals(tl__region_t* r, size_t* bytes, size_t* blocks) {
  *bytes = *blocks = 0;
  pthread_mutex_lock(&tl__caches_lock);
  for (tl__cache_t* c = r->caches; c; c = c->next) {
    *bytes += atomic_load_explicit(&c->bytes, memory_order_relaxed);
    *blocks += atomic_load_explicit(&c->blocks, memory_order_relaxed);
  }
  pthread_mutex_unlock(&tl__caches_lock);
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

/* Empties and deletes the calling thread's block caches and frees its anchors; runs as the
 * destructor of tl__exit_key at thread exit (the thread's _Thread_local storage is still valid
 * then). */
static void tl__thread_exit(void* arg) {
  tl__thread_t* me = arg;
  for (int i = 0; i < TL__HEAP_SLOTS; i++) {
    if (me->caches[i]) {
      tl__cache_delete(me->caches[i]);
      me->caches[i] = NULL;
    }
    if (me->anchors[i]) {
      mi_free(me->anchors[i]);
      me->anchors[i] = NULL;
    }
  }
  /* Last: the shard slot, for the next thread (a later destructor that frees an arena block
   * takes one again and re-arms this hook). */
  unsigned slot = me->shard_slot;
  me->shard_slot = 0;
  if (slot && slot - 1 < TL__SHARDS - 1) {
    pthread_mutex_lock(&tl__slots_lock);
    tl__free_slots[tl__nfree_slots++] = slot - 1;
    pthread_mutex_unlock(&tl__slots_lock);
  }
}

static void tl__exit_key_init(void) {
  tl__exit_key_ok = pthread_key_create(&tl__exit_key, tl__thread_exit) == 0;
}

/* Arms tl__thread_exit for the calling thread; 0 when the key could not be made. */
static int tl__watch_exit(tl__thread_t* me) {
  pthread_once(&tl__exit_once, tl__exit_key_init);
  return tl__exit_key_ok && pthread_setspecific(tl__exit_key, me) == 0;
}

unsigned tl__arena_slots_handed_out(void) {
  return atomic_load_explicit(&tl__next_shard, memory_order_relaxed);
}

/* The calling thread's heap in `r`, created (with its anchor and block cache) on first use;
 * NULL if mimalloc has none to give. */
static mi_heap_t* tl__thread_heap(tl__region_t* r, tl__thread_t* me) {
  int id = (int)r->mi_id;
  if (id < 0 || id >= TL__HEAP_SLOTS) return NULL;
  if (!me->heaps[id]) {
    mi_heap_t* heap = mi_heap_new_in_arena(r->mi_id);
    if (!heap) return NULL;
    me->heaps[id] = heap;
    /* The anchor and the cache are optimisations that need the exit hook (which frees the one
     * and empties the other): without it, in a full arena or without memory, go without. */
    if (tl__watch_exit(me)) {
      me->anchors[id] = mi_heap_malloc(heap, 1);
      me->caches[id] = tl__cache_new(r);
    }
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
  const tl__dev_api_t* api = tl__host_pin_api();
  r->pin_api = api;
  int err;
  if (!api->host_register || !api->host_unregister)
    err = tl__fail(TL_ENOSYS, "cudaHostRegister: the CUDA backend \"%s\" cannot page-lock",
                   api->name);
  else
    err = tl__cuda_error("cudaHostRegister", api->host_register(r->start, r->size));
  if (err == 0) {
    r->pinned = 1;
    snprintf(r->pin_detail, sizeof r->pin_detail, "pinned: %s(%zu bytes)",
             api->kind == TL_DEVICE_SIM ? "sim host_register" : "cudaHostRegister", r->size);
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
  tl__region_t* r = aligned_alloc(64, sizeof *r); /* sizeof is a multiple of 64 (_Alignas) */
  if (r) memset(r, 0, sizeof *r); /* all-zero atomics are valid zeros */
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
  if (r->pinned) r->pin_api->host_unregister(start);
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

/* Empties the calling thread's cache of `r` now and asks every other thread to empty theirs at
 * its next call (see "Per-thread block caches"). */
static void tl__trim(tl__region_t* r) {
  tl__cache_request_trim(r);
  unsigned id = (unsigned)r->mi_id;
  tl__thread_t* me = tl__self();
  if (id < TL__HEAP_SLOTS && me->caches[id]) tl__cache_empty(me->caches[id]);
}

int tl_arena_close(tl_arena_t* a) {
  tl__clear_detail();
  if (!a) return 0;
  tl__sums_t t = tl__sum(a);
  if (t.blocks != 0)
    return tl__fail(TL_EBUSY, "arena on node %d: %zu block(s), %zu bytes still in use; free "
                              "them before closing",
                    a->region->numa_node, t.blocks, t.bytes);
  tl__trim(a->region); /* the region waits for reuse: give the cached blocks back */
  pthread_mutex_lock(&tl__regions_lock);
  a->region->owned = 0;
  pthread_mutex_unlock(&tl__regions_lock);
  free(a);
  return 0;
}

int tl_arena_trim(tl_arena_t* a) {
  tl__clear_detail();
  if (!a) return tl__fail(TL_EINVAL, "tl_arena_trim: NULL argument");
  tl__trim(a->region);
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
  tl__region_t* r = a->region;
  tl__sums_t t = tl__sum(a);
  size_t cached, cached_blocks;
  tl__cache_totals(r, &cached, &cached_blocks);
  /* The calling thread's cache is empty by now; the others' give their blocks back at their
   * next call, so a retry after those threads ran can succeed. */
  if (cached) tl__cache_request_trim(r);
  return tl__fail(TL_ENOMEM,
                  "arena on node %d (%zu MiB%s) cannot serve %zu bytes%s: %zu bytes in %zu "
                  "block(s) in use, %zu bytes in %zu block(s) cached by other threads (given "
                  "back at their next call); free blocks or create a larger arena (mimalloc "
                  "gives each allocating thread segments of its own: allow 64 MiB per "
                  "allocating thread)",
                  r->numa_node, r->size >> 20, r->pinned ? ", pinned" : "", size, why,
                  t.bytes, t.blocks, cached, cached_blocks);
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
  tl__region_t* r = a->region;
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
  if (!*p && me->caches[id] && me->caches[id]->count) {
    /* This thread's cached blocks did not match the request: give them back, collect, retry. */
    tl__cache_empty(me->caches[id]);
    mi_heap_collect(heap, true);
    *p = tl__heap_alloc(heap, size, alignment);
  }
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
  tl__region_t* r = a->region;
  unsigned id = (unsigned)r->mi_id;
  void* p = NULL;
  size_t usable = 0;
  int hit = 0;
  /* The fastest path: a block this thread freed (see "Per-thread block caches"). */
  tl__cache_t* c = id < TL__HEAP_SLOTS ? me->caches[id] : NULL;
  if (c && c->count) hit = (p = tl__cache_take(c, size, alignment, &usable)) != NULL;
  if (!hit) {
#if defined(__SANITIZE_THREAD__)
    (void)atomic_load_explicit(&r->tsan_order, memory_order_acquire); /* every earlier free */
#endif
    /* The common path: this thread's heap exists and has room. */
    mi_heap_t* heap = id < TL__HEAP_SLOTS ? me->heaps[id] : NULL;
    if (TL__LIKELY(heap != NULL && size <= r->size)) p = tl__heap_alloc(heap, size, alignment);
    if (TL__UNLIKELY(!p || !tl__in_region(r, p))) {
      int err = tl__alloc_slow(a, me, size, alignment, &p);
      if (err) return err;
    }
    usable = mi_usable_size(p);
#if defined(__SANITIZE_THREAD__)
    atomic_fetch_add_explicit(&r->tsan_order, 1, memory_order_acq_rel);
#endif
    if ((c = me->caches[id]) != NULL) tl__cache_memo_put(c, size, alignment, usable);
  }
  int ex;
  tl__shard_t* sh = tl__shard(a, me, &ex);
  tl__shard_add(&sh->bytes, usable, ex);
  tl__shard_add(&sh->blocks, 1, ex);
  if (hit) tl__shard_add64(&sh->hits, 1, ex);
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
  tl__region_t* r = a->region;
  if (TL__UNLIKELY(!tl__in_region(r, p)))
    return tl__fail(TL_EINVAL, "tl_arena_free: %p is not inside this arena's region", p);
  size_t usable = mi_usable_size(p);
  /* Counters first, then the cache or mi_free: see the comment on struct tl_arena_s. */
  int ex;
  tl__shard_t* sh = tl__shard(a, me, &ex);
  tl__shard_add(&sh->bytes, (size_t)0 - usable, ex);
  tl__shard_add(&sh->blocks, (size_t)0 - 1, ex);
  unsigned id = (unsigned)r->mi_id;
  tl__cache_t* c = id < TL__HEAP_SLOTS ? me->caches[id] : NULL;
  if (c && tl__cache_put(c, p, usable)) return 0;
#if defined(__SANITIZE_THREAD__)
  atomic_fetch_sub_explicit(&r->tsan_order, 1, memory_order_release);
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
  tl__region_t* r = a->region;
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
  out->cache_hits = t.hits;
  tl__cache_totals(r, &out->cached_bytes, &out->cached_blocks);
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
