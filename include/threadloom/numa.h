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
  int cuda_index;        /* the CUDA ordinal recorded in the topology ("cuda3"), -1 if none */
  char pci_bus_id[32];   /* "0000:3b:00.0" */
  char name[128];        /* the device name hwloc reports, "" if none */
  int numa_node;         /* OS index of the local NUMA node, -1 when unknown */
  int local_pus;         /* allowed PUs local to the GPU (its non-I/O ancestor's cpuset) */
  char local_cpus[256];  /* those PUs as a list string, "0-15,32-47" */
} tl_topo_gpu_t;

typedef struct {
  int index;         /* logical index (hwloc L#) */
  int numa_node;     /* OS index of its NUMA node, -1 when unknown */
  int package;       /* logical index of its package */
  int allowed_pus;   /* its PUs this process may run on (0: the core is not usable) */
  char pus[64];      /* all its PUs, "3,67" */
} tl_topo_core_t;

/* Loads a topology. xml_path NULL: this machine (hwloc honours HWLOC_XMLFILE). The caller owns
 * *out and releases it with tl_topo_close(). Errors: TL_EINVAL (out NULL), TL_ENOENT (no such
 * XML file), TL_ETOPOLOGY (hwloc failed; tl_err_detail() says where), TL_ENOMEM. */
TL_EXTERN int tl_topo_init(tl_topo_t** out, const char* xml_path);
/* Loads an hwloc synthetic topology ("pack:2 numa:2 core:28 pu:2"), for tests and planning
 * what-ifs; it has no GPUs. Errors: TL_EINVAL, TL_ETOPOLOGY (bad description), TL_ENOMEM. */
TL_EXTERN int tl_topo_init_synthetic(tl_topo_t** out, const char* description);
/* Releases a topology; NULL is ignored. Plans made from it stay valid (they copy what they use). */
TL_EXTERN void tl_topo_close(tl_topo_t* topo);
/* Fills *out. Errors: TL_EINVAL. */
TL_EXTERN int tl_topo_summary(const tl_topo_t* topo, tl_topo_summary_t* out);
/* Fills *out for GPU `index` (0 <= index < summary.gpus). Errors: TL_EINVAL, TL_ENODEV. */
TL_EXTERN int tl_topo_gpu(const tl_topo_t* topo, int index, tl_topo_gpu_t* out);
/* Fills *out for core `index` (0 <= index < summary.cores). Errors: TL_EINVAL. */
TL_EXTERN int tl_topo_core(const tl_topo_t* topo, int index, tl_topo_core_t* out);
/* API version of the loaded hwloc library, as 0xMMmmpp (hwloc 2.9 has API 2.8.0). */
TL_EXTERN unsigned tl_hwloc_version(void);
/* The hwloc release threadloom was built against, "2.9.0". Static storage. */
TL_EXTERN const char* tl_hwloc_build_version(void);
/* 1 when the kernel reports NUMA support to libnuma, else 0. */
TL_EXTERN int tl_numa_available(void);
/* mimalloc's version as MAJOR*100+MINOR*10+PATCH (209 for 2.0.9). */
TL_EXTERN int tl_mimalloc_version(void);

// ---------------------------------------------------------------------------------------------
// The placement plan
// ---------------------------------------------------------------------------------------------

/* The roles a plan places. Launch and loader threads are hot (they run flat out); the main
 * thread and checkpoint I/O threads are light (they mostly wait) and may share cores. */
typedef enum {
  TL_ROLE_MAIN = 0,   /* the process's main thread */
  TL_ROLE_LAUNCH = 1, /* one per GPU: launches its kernels and copies; its core is reserved */
  TL_ROLE_LOADER = 2, /* per GPU: loads, transforms and collates batches for it */
  TL_ROLE_IO = 3      /* checkpoint I/O; not tied to a GPU */
} tl_role_t;

typedef struct {
  int gpus;            /* plan for the first `gpus` GPUs; -1: all (default) */
  int loaders_per_gpu; /* loader threads per GPU (in all when there is no GPU); -1: auto, i.e. the
                          free cores shared out, at least 1 (default) */
  int io_threads;      /* checkpoint I/O threads, >= 0 (default 1) */
  int main_thread;     /* 1: give the main thread a slot (default 1) */
  const char* cpus;    /* restrict to these PUs ("0-7,16"), intersected with the allowed ones;
                          NULL: all allowed PUs (default) */
  const char* const* gpu_bus_ids; /* the GPUs in CUDA order by PCI bus id, e.g. from
                          tl_cuda_device_info(); NULL: the topology's PCI order, which is CUDA's
                          with CUDA_DEVICE_ORDER=PCI_BUS_ID and no CUDA_VISIBLE_DEVICES */
  int ngpu_bus_ids;    /* entries in gpu_bus_ids */
  const int* device_nodes; /* devices the topology does not show (simulated ones, see
                          device.h), in order: the NUMA node (OS index) each is local to, -1 for
                          none (every core is as near). When set, the plan covers these devices
                          as its GPUs instead of the topology's; gpu_bus_ids must then be NULL.
                          NULL: the topology's GPUs (default) */
  int ndevice_nodes;   /* entries in device_nodes */
} tl_plan_spec_t;

typedef struct {
  int id;             /* index of the slot in the plan */
  tl_role_t role;
  int gpu;            /* the GPU it serves (CUDA ordinal per the spec), -1 for main/io/no GPU */
  int rank;           /* index among the slots of the same role and GPU */
  int core;           /* logical index of its core */
  int numa_node;      /* its core's NUMA node (OS index), -1 when unknown */
  char cpus[64];      /* the PUs it is pinned to: its core's usable PUs, "3,67" */
  int hot_on_core;    /* hot threads on its core, itself included if hot */
  int threads_on_core;/* all planned threads on its core */
  int local;          /* 1: the core is local to its GPU (or it has no GPU) */
  char why[224];      /* one sentence: why this core */
} tl_plan_slot_t;

typedef struct tl_plan_s tl_plan_t;

/* Sets the defaults documented in tl_plan_spec_t. */
TL_EXTERN void tl_plan_spec_default(tl_plan_spec_t* spec);
/* Plans thread placement on `topo` for `spec` (NULL: defaults). Rules, in order: each launch
 * thread gets a core local to its GPU, reserved from loader work; hot threads never share a
 * core while a hot-free one exists; loaders take cores local to their GPU first, then the
 * nearest free ones; with too few cores, threads share the least loaded cores, launch cores
 * last. Every slot's `why` says which rule placed it. The plan copies what it needs: topo may
 * be closed first. Caller owns *out (tl_plan_close). Errors: TL_EINVAL (bad spec, or no usable
 * PU in spec->cpus, device_nodes with gpu_bus_ids), TL_ENODEV (more GPUs asked than found,
 * or a bus id not in the topology), TL_ENOMEM. A device node without usable cores is treated
 * as a GPU without local cores (its threads go to the nearest free ones). */
TL_EXTERN int tl_plan_init(tl_plan_t** out, const tl_topo_t* topo, const tl_plan_spec_t* spec);
/* Releases a plan; NULL is ignored. */
TL_EXTERN void tl_plan_close(tl_plan_t* plan);
/* Number of slots. */
TL_EXTERN int tl_plan_size(const tl_plan_t* plan);
/* Number of GPUs planned for. */
TL_EXTERN int tl_plan_gpus(const tl_plan_t* plan);
/* Fills *out with slot `id`. Errors: TL_EINVAL. */
TL_EXTERN int tl_plan_slot(const tl_plan_t* plan, int id, tl_plan_slot_t* out);
/* The id of the slot (role, gpu, rank). Errors: TL_EINVAL (no such slot; the detail says how
 * many the plan has for that role and GPU). */
TL_EXTERN int tl_plan_find(const tl_plan_t* plan, tl_role_t role, int gpu, int rank, int* id);
/* Hands out the slots of (role, gpu) in turn, wrapping around when all are taken (the caller
 * then shares a core; *wrapped says so). Thread-safe on one object. Errors: TL_EINVAL (the plan
 * has no slot of that role for that GPU). */
TL_EXTERN int tl_plan_claim(tl_plan_t* plan, tl_role_t role, int gpu, int* id, int* wrapped);
/* Writes the plan as text, one slot a line with its reason, into buf (truncated to cap, always
 * terminated); returns the length the whole text needs, or a negative TL_E* code. */
TL_EXTERN int tl_plan_format(const tl_plan_t* plan, char* buf, size_t cap);
/* "main", "launch", "loader", "io"; "?" for others. */
TL_EXTERN const char* tl_role_name(tl_role_t role);
/* Parses a role name. Errors: TL_EINVAL. */
TL_EXTERN int tl_role_parse(const char* name, tl_role_t* out);

// ---------------------------------------------------------------------------------------------
// Pinning
// ---------------------------------------------------------------------------------------------

typedef struct {
  char cpus[64];       /* the PUs the thread now runs on */
  int numa_node;       /* the node its memory is now preferred from, -1: unchanged */
  char refused[256];   /* what was asked but not done, and why; "" when everything was done */
} tl_pin_result_t;

/* Pins the calling thread to plan slot `id`: CPU affinity to the slot's PUs, and memory
 * preferred from the slot's NUMA node (when the machine has NUMA). A plan made from an XML or
 * synthetic topology describes another machine: pinning with it fails (TL_EINVAL). When the
 * CPU affinity is refused by the kernel (cgroup or cpuset changed since the plan was made),
 * nothing changes and the call fails with TL_EPERM or TL_EINVAL; a refused memory policy is
 * reported in out->refused and the call succeeds. out may be NULL. */
TL_EXTERN int tl_pin_self(const tl_plan_t* plan, int id, tl_pin_result_t* out);
/* Pins another thread, named by its kernel thread id (gettid(); Python's Thread.native_id), to
 * plan slot `id`: CPU affinity only, since a thread's memory policy can be set by itself alone
 * (out->refused says so when the slot has a NUMA node). Errors: as tl_pin_self, and TL_EINVAL
 * for a thread id that does not exist. */
TL_EXTERN int tl_pin_tid(const tl_plan_t* plan, int id, int tid, tl_pin_result_t* out);
/* The calling thread's current CPU affinity as a list string. Errors: TL_ERANGE (buf small). */
TL_EXTERN int tl_pin_current(char* buf, size_t cap);
/* Sets the calling thread's CPU affinity to a list string ("0-3,8") and, with numa_node >= 0,
 * prefers memory from that node; numa_node -1 restores local allocation. For undoing a pin.
 * Errors: TL_EINVAL (unparsable or empty list), TL_EPERM. */
TL_EXTERN int tl_pin_set(const char* cpus, int numa_node);

TL_END_DECLS

#endif /* THREADLOOM_NUMA_H */
