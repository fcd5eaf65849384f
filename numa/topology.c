/* numa/topology.c: loading the hardware topology with hwloc.
 *
 * The topology is loaded once with I/O devices kept and disallowed PUs included, so the
 * summary can report both the whole machine and the part this process may use. GPUs are found
 * as NVIDIA PCI devices (vendor 0x10de, display or 3D controller class) rather than through
 * hwloc's cudart/nvml helpers: those read /sys and fail on XML topologies, and the CUDA/NVML
 * plugins are not part of Debian's hwloc. A GPU's locality is the cpuset and nodeset of its
 * first non-I/O ancestor (the package or NUMA node its PCI root hangs off). */
#include "numa/internal.h"

#include <errno.h>
#include <mimalloc.h>
#include <numa.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

// ---------------------------------------------------------------------------------------------
// Versions of the libraries below this part
// ---------------------------------------------------------------------------------------------

unsigned tl_hwloc_version(void) { return hwloc_get_api_version(); }

const char* tl_hwloc_build_version(void) { return HWLOC_VERSION; }

int tl_numa_available(void) { return numa_available() >= 0 ? 1 : 0; }

int tl_mimalloc_version(void) { return mi_version(); }

// ---------------------------------------------------------------------------------------------
// GPUs
// ---------------------------------------------------------------------------------------------

static int tl__is_nvidia_gpu(hwloc_obj_t pci) {
  unsigned cls = pci->attr->pcidev.class_id;
  return pci->attr->pcidev.vendor_id == 0x10de && (cls == 0x0300 || cls == 0x0302);
}

static void tl__gpu_fill(tl_topo_t* t, hwloc_obj_t pci, tl_topo_gpu_t* g, hwloc_bitmap_t* local_out) {
  memset(g, 0, sizeof *g);
  g->cuda_index = -1;
  snprintf(g->pci_bus_id, sizeof g->pci_bus_id, "%04x:%02x:%02x.%01x", pci->attr->pcidev.domain,
           pci->attr->pcidev.bus, pci->attr->pcidev.dev, pci->attr->pcidev.func);
  const char* name = hwloc_obj_get_info_by_name(pci, "PCIDevice");
  /* An OS device child (cuda0, nvml0, card0) may carry a better name. */
  for (hwloc_obj_t os = pci->io_first_child; os; os = os->next_sibling) {
    const char* model = hwloc_obj_get_info_by_name(os, "GPUModel");
    if (model) name = model;
    int idx;
    if (os->name && sscanf(os->name, "cuda%d", &idx) == 1) g->cuda_index = idx;
  }
  tl__strlcpy(g->name, name ? name : "", sizeof g->name);
  g->numa_node = -1;
  hwloc_obj_t anc = hwloc_get_non_io_ancestor_obj(t->hw, pci);
  if (!anc) return;
  hwloc_bitmap_t local = hwloc_bitmap_dup(anc->cpuset);
  if (!local) return;
  hwloc_bitmap_and(local, local, hwloc_topology_get_allowed_cpuset(t->hw));
  g->local_pus = hwloc_bitmap_weight(local);
  if (hwloc_bitmap_list_snprintf(g->local_cpus, sizeof g->local_cpus, local) < 0)
    g->local_cpus[0] = '\0';
  *local_out = local; /* owned by the topology from here */
  if (anc->nodeset && !hwloc_bitmap_iszero(anc->nodeset))
    g->numa_node = hwloc_bitmap_first(anc->nodeset);
}

static int tl__find_gpus(tl_topo_t* t) {
  int n = 0;
  for (hwloc_obj_t p = NULL; (p = hwloc_get_next_pcidev(t->hw, p));)
    if (tl__is_nvidia_gpu(p)) n++;
  if (n == 0) return 0;
  t->gpus = calloc((size_t)n, sizeof *t->gpus);
  t->gpu_local = calloc((size_t)n, sizeof *t->gpu_local);
  if (!t->gpus || !t->gpu_local) return tl__fail(TL_ENOMEM, "topology: %d GPU records", n);
  /* hwloc lists PCI devices in bus order, which is CUDA's PCI_BUS_ID order. */
  for (hwloc_obj_t p = NULL; (p = hwloc_get_next_pcidev(t->hw, p));) {
    if (!tl__is_nvidia_gpu(p)) continue;
    tl__gpu_fill(t, p, &t->gpus[t->ngpus], &t->gpu_local[t->ngpus]);
    t->gpus[t->ngpus].index = t->ngpus;
    if (!t->gpu_local[t->ngpus] && !(t->gpu_local[t->ngpus] = hwloc_bitmap_alloc()))
      return tl__fail(TL_ENOMEM, "topology: GPU cpuset");
    t->ngpus++;
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Cores
// ---------------------------------------------------------------------------------------------

static int tl__find_cores(tl_topo_t* t) {
  int n = hwloc_get_nbobjs_by_type(t->hw, HWLOC_OBJ_CORE);
  if (n <= 0) return tl__fail(TL_ETOPOLOGY, "topology has no cores");
  t->cores = calloc((size_t)n, sizeof *t->cores);
  if (!t->cores) return tl__fail(TL_ENOMEM, "topology: %d core records", n);
  hwloc_const_cpuset_t allowed = hwloc_topology_get_allowed_cpuset(t->hw);
  for (int i = 0; i < n; i++) {
    hwloc_obj_t o = hwloc_get_obj_by_type(t->hw, HWLOC_OBJ_CORE, (unsigned)i);
    tl__core_t* c = &t->cores[i];
    c->index = i;
    c->pus = hwloc_bitmap_dup(o->cpuset);
    t->ncores = i + 1; /* so close() frees what was made */
    if (!c->pus) return tl__fail(TL_ENOMEM, "topology: core cpuset");
    hwloc_bitmap_and(c->pus, c->pus, allowed);
    c->numa_node = (o->nodeset && !hwloc_bitmap_iszero(o->nodeset)) ? hwloc_bitmap_first(o->nodeset) : -1;
    hwloc_obj_t pkg = hwloc_get_ancestor_obj_by_type(t->hw, HWLOC_OBJ_PACKAGE, o);
    c->package = pkg ? (int)pkg->logical_index : 0;
  }
  return 0;
}

int tl_topo_core(const tl_topo_t* topo, int index, tl_topo_core_t* out) {
  tl__clear_detail();
  if (!topo || !out) return tl__fail(TL_EINVAL, "tl_topo_core: NULL argument");
  if (index < 0 || index >= topo->ncores)
    return tl__fail(TL_EINVAL, "core %d: the topology has %d core(s)", index, topo->ncores);
  const tl__core_t* c = &topo->cores[index];
  memset(out, 0, sizeof *out);
  out->index = c->index;
  out->numa_node = c->numa_node;
  out->package = c->package;
  out->allowed_pus = hwloc_bitmap_weight(c->pus);
  hwloc_obj_t o = hwloc_get_obj_by_type(topo->hw, HWLOC_OBJ_CORE, (unsigned)index);
  if (hwloc_bitmap_list_snprintf(out->pus, sizeof out->pus, o->cpuset) < 0) out->pus[0] = '\0';
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Init / close
// ---------------------------------------------------------------------------------------------

static int tl__count_allowed_cores(hwloc_topology_t hw) {
  hwloc_const_cpuset_t allowed = hwloc_topology_get_allowed_cpuset(hw);
  int n = 0;
  int depth = hwloc_get_type_depth(hw, HWLOC_OBJ_CORE);
  int ncores = hwloc_get_nbobjs_by_depth(hw, depth);
  for (int i = 0; i < ncores; i++)
    if (hwloc_bitmap_intersects(hwloc_get_obj_by_depth(hw, depth, i)->cpuset, allowed)) n++;
  return n;
}

/* Loads from this machine (xml and synthetic NULL), an XML file, or a synthetic description. */
static int tl__topo_load(tl_topo_t** out, const char* xml_path, const char* synthetic) {
  tl_topo_t* t = calloc(1, sizeof *t);
  if (!t) return tl__fail(TL_ENOMEM, "topology: %zu bytes", sizeof *t);
  if (hwloc_topology_init(&t->hw) != 0) {
    free(t);
    return tl__fail(TL_ETOPOLOGY, "hwloc_topology_init: %s", strerror(errno));
  }
  int err = 0;
  const char* where = "hwloc_topology_set_io_types_filter";
  if (hwloc_topology_set_io_types_filter(t->hw, HWLOC_TYPE_FILTER_KEEP_IMPORTANT) != 0) goto fail;
  where = "hwloc_topology_set_flags";
  if (hwloc_topology_set_flags(t->hw, HWLOC_TOPOLOGY_FLAG_INCLUDE_DISALLOWED) != 0) goto fail;
  if (xml_path) {
    where = "hwloc_topology_set_xml";
    if (hwloc_topology_set_xml(t->hw, xml_path) != 0) goto fail;
  }
  if (synthetic) {
    where = "hwloc_topology_set_synthetic";
    if (hwloc_topology_set_synthetic(t->hw, synthetic) != 0) goto fail;
  }
  where = "hwloc_topology_load";
  if (hwloc_topology_load(t->hw) != 0) goto fail;

  tl_topo_summary_t* s = &t->summary;
  s->packages = hwloc_get_nbobjs_by_type(t->hw, HWLOC_OBJ_PACKAGE);
  s->numa_nodes = hwloc_get_nbobjs_by_type(t->hw, HWLOC_OBJ_NUMANODE);
  s->cores = hwloc_get_nbobjs_by_type(t->hw, HWLOC_OBJ_CORE);
  s->pus = hwloc_get_nbobjs_by_type(t->hw, HWLOC_OBJ_PU);
  s->allowed_pus = hwloc_bitmap_weight(hwloc_topology_get_allowed_cpuset(t->hw));
  s->allowed_cores = tl__count_allowed_cores(t->hw);
  s->is_this_system = hwloc_topology_is_thissystem(t->hw);
  if (s->packages < 1) s->packages = 1; /* some VMs expose no package object */
  if ((err = tl__find_gpus(t)) != 0 || (err = tl__find_cores(t)) != 0) {
    tl_topo_close(t);
    return err;
  }
  s->gpus = t->ngpus;
  *out = t;
  return 0;

fail:
  err = errno;
  hwloc_topology_destroy(t->hw);
  free(t);
  const char* what = xml_path ? xml_path : synthetic;
  return tl__fail(err == ENOMEM ? TL_ENOMEM : TL_ETOPOLOGY, "%s%s%s: %s%s", where,
                  what ? " " : "", what ? what : "", strerror(err),
                  synthetic ? " (a synthetic description ends with pu:N, e.g. \"pack:2 core:4 pu:2\")" : "");
}

int tl_topo_init(tl_topo_t** out, const char* xml_path) {
  tl__clear_detail();
  if (!out) return tl__fail(TL_EINVAL, "tl_topo_init: out is NULL");
  *out = NULL;
  if (xml_path && access(xml_path, R_OK) != 0)
    return tl__fail(tl_translate_sys_error(errno), "topology file %s: %s", xml_path,
                    strerror(errno));
  return tl__topo_load(out, xml_path, NULL);
}

int tl_topo_init_synthetic(tl_topo_t** out, const char* description) {
  tl__clear_detail();
  if (!out || !description) return tl__fail(TL_EINVAL, "tl_topo_init_synthetic: NULL argument");
  *out = NULL;
  return tl__topo_load(out, NULL, description);
}

void tl_topo_close(tl_topo_t* topo) {
  if (!topo) return;
  hwloc_topology_destroy(topo->hw);
  for (int i = 0; topo->gpu_local && i < topo->ngpus; i++) hwloc_bitmap_free(topo->gpu_local[i]);
  for (int i = 0; i < topo->ncores; i++) hwloc_bitmap_free(topo->cores[i].pus);
  free(topo->gpu_local);
  free(topo->cores);
  free(topo->gpus);
  free(topo);
}

int tl_topo_summary(const tl_topo_t* topo, tl_topo_summary_t* out) {
  tl__clear_detail();
  if (!topo || !out) return tl__fail(TL_EINVAL, "tl_topo_summary: NULL argument");
  *out = topo->summary;
  return 0;
}

int tl_topo_gpu(const tl_topo_t* topo, int index, tl_topo_gpu_t* out) {
  tl__clear_detail();
  if (!topo || !out) return tl__fail(TL_EINVAL, "tl_topo_gpu: NULL argument");
  if (index < 0 || index >= topo->ngpus)
    return tl__fail(TL_ENODEV, "GPU %d: the topology has %d GPU(s)", index, topo->ngpus);
  *out = topo->gpus[index];
  return 0;
}
