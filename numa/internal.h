/* numa/internal.h: the numa part's private state. */
#ifndef THREADLOOM_NUMA_INTERNAL_H
#define THREADLOOM_NUMA_INTERNAL_H

#include <hwloc.h>

#include "core/internal.h"
#include "threadloom/numa.h"

struct tl_topo_s {
  hwloc_topology_t hw;      /* loaded with I/O devices; includes disallowed PUs */
  tl_topo_summary_t summary; /* computed once at init; read-only afterwards */
  int ngpus;                /* entries in gpus */
  tl_topo_gpu_t* gpus;      /* owned; PCI bus order */
};

#endif /* THREADLOOM_NUMA_INTERNAL_H */
