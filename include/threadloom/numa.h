/* threadloom/numa.h: the machine's topology as threadloom sees it.
 *
 * A tl_topo_t is a read-only snapshot of packages, NUMA nodes, cores, processing units (PUs) and
 * NVIDIA GPUs (found as PCI devices, with the cores and NUMA node local to each), loaded from
 * this machine or from an hwloc XML file (recorded topologies for tests). It honours the
 * process's allowed cpuset (taskset, cgroups, SLURM binding): `allowed_*` counts only what this
 * process may run on. Once initialised, a tl_topo_t is thread-safe on one object (read-only). */
#ifndef THREADLOOM_NUMA_H
#define THREADLOOM_NUMA_H

#include "threadloom/common.h"

TL_BEGIN_DECLS

typedef struct tl_topo_s tl_topo_t;

typedef struct {
  int packages;       /* physical packages (sockets) */
  int numa_nodes;     /* NUMA nodes with memory */
  int cores;          /* physical cores in the whole machine */
  int pus;            /* hardware threads in the whole machine */
  int allowed_cores;  /* cores with at least one PU this process may run on */
  int allowed_pus;    /* PUs this process may run on */
  int gpus;           /* NVIDIA GPUs found on the PCI bus */
  int is_this_system; /* 1: the running machine; 0: loaded from XML (binding is a no-op) */
} tl_topo_summary_t;

typedef struct {
  int index;             /* 0-based, in PCI bus order (CUDA's PCI_BUS_ID order) */
  char pci_bus_id[32];   /* "0000:3b:00.0" */
  char name[128];        /* the device name hwloc reports, "" if none */
  int numa_node;         /* OS index of the local NUMA node, -1 when unknown */
  int local_pus;         /* allowed PUs local to the GPU (its non-I/O ancestor's cpuset) */
  char local_cpus[256];  /* those PUs as a list string, "0-15,32-47" */
} tl_topo_gpu_t;

/* Loads a topology. xml_path NULL: this machine (hwloc honours HWLOC_XMLFILE). The caller owns
 * *out and releases it with tl_topo_close(). Errors: TL_EINVAL (out NULL), TL_ENOENT (no such
 * XML file), TL_ETOPOLOGY (hwloc failed; tl_err_detail() says where), TL_ENOMEM. */
TL_EXTERN int tl_topo_init(tl_topo_t** out, const char* xml_path);
/* Releases a topology; NULL is ignored. */
TL_EXTERN void tl_topo_close(tl_topo_t* topo);
/* Fills *out. Errors: TL_EINVAL. */
TL_EXTERN int tl_topo_summary(const tl_topo_t* topo, tl_topo_summary_t* out);
/* Fills *out for GPU `index` (0 <= index < summary.gpus). Errors: TL_EINVAL, TL_ENODEV. */
TL_EXTERN int tl_topo_gpu(const tl_topo_t* topo, int index, tl_topo_gpu_t* out);
/* API version of the loaded hwloc library, as 0xMMmmpp (hwloc 2.9 has API 2.8.0). */
TL_EXTERN unsigned tl_hwloc_version(void);
/* The hwloc release threadloom was built against, "2.9.0". Static storage. */
TL_EXTERN const char* tl_hwloc_build_version(void);
/* 1 when the kernel reports NUMA support to libnuma, else 0. */
TL_EXTERN int tl_numa_available(void);
/* mimalloc's version as MAJOR*100+MINOR*10+PATCH (209 for 2.0.9). */
TL_EXTERN int tl_mimalloc_version(void);

TL_END_DECLS

#endif /* THREADLOOM_NUMA_H */
