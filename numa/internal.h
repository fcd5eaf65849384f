/* numa/internal.h: the numa part's private state. */
#ifndef THREADLOOM_NUMA_INTERNAL_H
#define THREADLOOM_NUMA_INTERNAL_H

#include <hwloc.h>

#include "core/internal.h"
#include "threadloom/numa.h"

/* One core as the planner sees it. */
typedef struct {
  int index;              /* logical index (hwloc L#) among all cores */
  int numa_node;          /* OS index of its first NUMA node, -1 when unknown */
  int package;            /* logical index of its package, 0 when the machine shows none */
  hwloc_bitmap_t pus;     /* owned: its PUs this process may use (empty: none allowed) */
} tl__core_t;

struct tl_topo_s {
  hwloc_topology_t hw;       /* loaded with I/O devices; includes disallowed PUs */
  tl_topo_summary_t summary; /* computed once at init; read-only afterwards */
  int ngpus;                 /* entries in gpus and gpu_local */
  tl_topo_gpu_t* gpus;       /* owned; PCI bus order */
  hwloc_bitmap_t* gpu_local; /* owned: allowed PUs local to each GPU (may be empty) */
  int ncores;                /* entries in cores */
  tl__core_t* cores;         /* owned; logical order */
};

/* arena.c: how many counter-shard slots threads have taken so far (the high-water mark of
 * threads using arenas at once, as exited threads' slots are reused); for tests. */
unsigned tl__arena_slots_handed_out(void);

#endif /* THREADLOOM_NUMA_INTERNAL_H */
