/* numa/plan.c: the placement plan, which core each threadloom thread runs on, and why.
 *
 * A training process has per GPU one launch thread (launches kernels and copies; latency
 * matters, so its core is reserved) and N loader threads (CPU-heavy batch preparation), plus
 * the main thread and checkpoint I/O threads. Running a GPU's threads on its own socket keeps
 * its host-to-device traffic local; keeping loaders off the launch cores removes the "noisy
 * neighbour" that slows kernel launches.
 *
 * The planner works on cores (a thread is pinned to all usable PUs of its core, so SMT siblings
 * stay available to it) in four passes: launch threads, the main thread, I/O threads, then
 * loaders round-robin over GPUs so scarce cores are shared out fairly. Each pass picks the best
 * core by an explicit order of preferences (see pick_*), and records in `why` which preference
 * decided. The plan copies cpusets out of the topology and does not refer to it afterwards.
 *
 * Thread-safety: a plan is read-only after tl_plan_init except the per-group claim counters,
 * which are atomics (any thread may claim). */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "numa/internal.h"
#include "numa/plan.h"

// ---------------------------------------------------------------------------------------------
// Roles
// ---------------------------------------------------------------------------------------------

static const char* const tl__role_names[] = {"main", "launch", "loader", "io"};

const char* tl_role_name(tl_role_t role) {
  return (unsigned)role < 4 ? tl__role_names[role] : "?";
}

int tl_role_parse(const char* name, tl_role_t* out) {
  tl__clear_detail();
  if (!name || !out) return tl__fail(TL_EINVAL, "tl_role_parse: NULL argument");
  for (int i = 0; i < 4; i++)
    if (strcmp(name, tl__role_names[i]) == 0) {
      *out = (tl_role_t)i;
      return 0;
    }
  if (strcmp(name, "feeder") == 0) {
    *out = TL_ROLE_LOADER;
    return 0;
  }
  return tl__fail(TL_EINVAL, "unknown role '%s': use main, launch, loader (or feeder) or io", name);
}

static int tl__role_is_hot(tl_role_t r) { return r == TL_ROLE_LAUNCH || r == TL_ROLE_LOADER; }

// ---------------------------------------------------------------------------------------------
// Planning state
// ---------------------------------------------------------------------------------------------

typedef struct {
  const tl__core_t* core; /* the topology's core (valid during planning only) */
  int hot;                /* hot threads placed on it so far */
  int total;              /* all threads placed on it so far */
  int reserved;           /* 1: a launch thread's core; loaders avoid it */
} tl__cand_t;

typedef struct {
  tl__cand_t* c;      /* usable cores */
  int n;              /* entries in c */
  hwloc_bitmap_t* gl; /* per planned GPU: usable PUs local to it (may be empty) */
  int* gnode;         /* per planned GPU: its NUMA node, -1 unknown */
  int* gpkg;          /* per planned GPU: package of its first local core, -1 unknown */
} tl__planner_t;

static int tl__is_local(const tl__planner_t* p, int gpu, const tl__cand_t* c) {
  return gpu < 0 || hwloc_bitmap_intersects(c->core->pus, p->gl[gpu]);
}

/* Distance class of a core from a GPU: 0 local, 1 same package, 2 elsewhere. */
static int tl__distance(const tl__planner_t* p, int gpu, const tl__cand_t* c) {
  if (tl__is_local(p, gpu, c)) return 0;
  if (p->gpkg[gpu] >= 0 && c->core->package == p->gpkg[gpu]) return 1;
  return 2;
}

enum { ANY = 0, LOCAL = 1 };
enum { ALLOW_RESERVED = 0, NO_RESERVED = 1 };

/* The best core among candidates passing the filters, by (distance, hot, total, index);
 * hot_free: only cores with no hot thread. NULL when none passes. */
static tl__cand_t* tl__pick(tl__planner_t* p, int gpu, int where, int no_reserved, int hot_free) {
  tl__cand_t* best = NULL;
  int bd = 0;
  for (int i = 0; i < p->n; i++) {
    tl__cand_t* c = &p->c[i];
    if (no_reserved && c->reserved) continue;
    if (hot_free && c->hot > 0) continue;
    if (where == LOCAL && !tl__is_local(p, gpu, c)) continue;
    int d = gpu >= 0 ? tl__distance(p, gpu, c) : 0;
    if (!best || d < bd || (d == bd && (c->hot < best->hot || (c->hot == best->hot && c->total < best->total)))) {
      best = c;
      bd = d;
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// The plan object
// ---------------------------------------------------------------------------------------------

typedef struct {
  tl_role_t role;        /* the group's role */
  int gpu;               /* and GPU */
  int first;             /* id of its first slot; its slots are contiguous */
  int count;             /* number of slots */
  _Atomic unsigned next; /* claim counter, shared by every thread that claims */
} tl__group_t;

struct tl_plan_s {
  int nslots;             /* entries in slots and slot_pus */
  tl_plan_slot_t* slots;  /* owned, in id order (grouped by role and GPU) */
  hwloc_bitmap_t* slot_pus; /* owned: each slot's PUs, for pinning */
  int ngroups;            /* entries in groups */
  tl__group_t* groups;    /* owned */
  int ngpus;              /* GPUs planned for */
  int is_this_system;     /* 0: planned on XML/synthetic; pinning is refused */
  int cap;                /* allocated slots */
};

static int tl__plan_push(tl_plan_t* pl, tl__planner_t* p, tl_role_t role, int gpu, int rank,
                         tl__cand_t* c, const char* why) {
  if (pl->nslots == pl->cap) {
    int cap = pl->cap ? pl->cap * 2 : 16;
    tl_plan_slot_t* s = realloc(pl->slots, (size_t)cap * sizeof *s);
    if (!s) return tl__fail(TL_ENOMEM, "plan: %d slots", cap);
    pl->slots = s;
    hwloc_bitmap_t* b = realloc(pl->slot_pus, (size_t)cap * sizeof *b);
    if (!b) return tl__fail(TL_ENOMEM, "plan: %d slots", cap);
    pl->slot_pus = b;
    pl->cap = cap;
  }
  int id = pl->nslots;
  tl_plan_slot_t* s = &pl->slots[id];
  memset(s, 0, sizeof *s);
  s->id = id;
  s->role = role;
  s->gpu = gpu;
  s->rank = rank;
  s->core = c->core->index;
  s->numa_node = c->core->numa_node;
  s->local = role == TL_ROLE_IO || role == TL_ROLE_MAIN || tl__is_local(p, gpu, c);
  hwloc_bitmap_list_snprintf(s->cpus, sizeof s->cpus, c->core->pus);
  tl__strlcpy(s->why, why, sizeof s->why);
  pl->slot_pus[id] = hwloc_bitmap_dup(c->core->pus);
  if (!pl->slot_pus[id]) return tl__fail(TL_ENOMEM, "plan: slot cpuset");
  pl->nslots++;
  c->total++;
  if (tl__role_is_hot(role)) c->hot++;
  return 0;
}

static int tl__plan_group(tl_plan_t* pl, tl_role_t role, int gpu, int first, int count) {
  if (count == 0) return 0;
  tl__group_t* g = realloc(pl->groups, (size_t)(pl->ngroups + 1) * sizeof *g);
  if (!g) return tl__fail(TL_ENOMEM, "plan: groups");
  pl->groups = g;
  g[pl->ngroups].role = role;
  g[pl->ngroups].gpu = gpu;
  g[pl->ngroups].first = first;
  g[pl->ngroups].count = count;
  atomic_init(&g[pl->ngroups].next, 0);
  pl->ngroups++;
  return 0;
}

/* Slots are pushed pass by pass (launch, main, io, loaders interleaved over GPUs); re-order them
 * so each (role, gpu) group is contiguous and ranks count up, then build the groups. */
static int tl__plan_regroup(tl_plan_t* pl) {
  int n = pl->nslots;
  tl_plan_slot_t* s = malloc((size_t)n * sizeof *s);
  hwloc_bitmap_t* b = malloc((size_t)n * sizeof *b);
  if (!s || !b) {
    free(s);
    free(b);
    return tl__fail(TL_ENOMEM, "plan: regroup");
  }
  int k = 0;
  for (int role = 0; role < 4; role++)
    for (int gpu = -1; gpu < pl->ngpus; gpu++) {
      int first = k;
      for (int i = 0; i < n; i++)
        if ((int)pl->slots[i].role == role && pl->slots[i].gpu == gpu) {
          s[k] = pl->slots[i];
          s[k].id = k;
          s[k].rank = k - first;
          b[k] = pl->slot_pus[i];
          k++;
        }
      int err = tl__plan_group(pl, (tl_role_t)role, gpu, first, k - first);
      if (err) {
        free(s);
        free(b);
        return err;
      }
    }
  free(pl->slots);
  free(pl->slot_pus);
  pl->slots = s;
  pl->slot_pus = b;
  pl->cap = n;
  return 0;
}

void tl_plan_spec_default(tl_plan_spec_t* spec) {
  memset(spec, 0, sizeof *spec);
  spec->gpus = -1;
  spec->loaders_per_gpu = -1;
  spec->io_threads = 1;
  spec->main_thread = 1;
}

void tl_plan_close(tl_plan_t* plan) {
  if (!plan) return;
  for (int i = 0; i < plan->nslots; i++) hwloc_bitmap_free(plan->slot_pus[i]);
  free(plan->slot_pus);
  free(plan->slots);
  free(plan->groups);
  free(plan);
}

// ---------------------------------------------------------------------------------------------
// The passes
// ---------------------------------------------------------------------------------------------

static void tl__fill_counts(tl_plan_t* pl, tl__planner_t* p) {
  for (int i = 0; i < pl->nslots; i++)
    for (int j = 0; j < p->n; j++)
      if (p->c[j].core->index == pl->slots[i].core) {
        pl->slots[i].hot_on_core = p->c[j].hot;
        pl->slots[i].threads_on_core = p->c[j].total;
      }
}

/* Picks the core for a hot thread of `gpu` (-1: none) in one of the round's stages; NULL when
 * the stage has nothing. Stage 0: a local core with no hot thread (unreserved); stage 1: the
 * nearest core with no hot thread (unreserved); stage 2: sharing, local first. `why` gets the
 * rule that decided. */
static tl__cand_t* tl__pick_hot(tl__planner_t* p, tl_role_t role, int gpu, int stage, const char** why) {
  tl__cand_t* c = NULL;
  int launch = role == TL_ROLE_LAUNCH;
  switch (stage) {
    case 0:
      c = tl__pick(p, gpu, LOCAL, NO_RESERVED, 1);
      *why = launch ? "a free core local to its GPU, reserved from loader work"
             : gpu >= 0 ? "a core local to its GPU with no other hot thread"
                        : "a core with no other hot thread";
      return c;
    case 1:
      c = tl__pick(p, gpu, ANY, NO_RESERVED, 1);
      *why = launch ? "no free core is local to its GPU: the nearest free core, reserved from loader work"
                    : "the local cores are taken: the nearest core with no other hot thread";
      return c;
    default:
      if (launch) {
        *why = "fewer cores than GPUs: shares the least loaded local core with another launch thread";
        if ((c = tl__pick(p, gpu, LOCAL, ALLOW_RESERVED, 0))) return c;
        *why = "fewer cores than GPUs: shares the least loaded core with another launch thread";
        return tl__pick(p, gpu, ANY, ALLOW_RESERVED, 0);
      }
      *why = "more hot threads than cores: shares the least loaded local core";
      if ((c = tl__pick(p, gpu, LOCAL, NO_RESERVED, 0))) return c;
      *why = "more hot threads than cores: shares the least loaded core";
      if ((c = tl__pick(p, gpu, ANY, NO_RESERVED, 0))) return c;
      *why = "only launch cores exist: shares one (the reservation cannot hold)";
      return tl__pick(p, gpu, ANY, ALLOW_RESERVED, 0);
  }
}

/* One round: one hot thread of `role` and `rank` for each GPU (or one with no GPU). Stages run
 * across all GPUs of the round before the next stage starts, so a GPU whose node is full does
 * not take the free cores of another GPU's node before that GPU has had its turn. */
static int tl__round(tl_plan_t* pl, tl__planner_t* p, tl_role_t role, int rank, int ngpus) {
  int groups = ngpus > 0 ? ngpus : 1;
  char placed[1024] = {0};
  if (groups > (int)sizeof placed) return tl__fail(TL_EINVAL, "plan: at most %zu GPUs", sizeof placed);
  char why[224];
  for (int stage = 0; stage < 3; stage++)
    for (int gi = 0; gi < groups; gi++) {
      if (placed[gi]) continue;
      int g = ngpus > 0 ? gi : -1;
      const char* rule;
      tl__cand_t* c = tl__pick_hot(p, role, g, stage, &rule);
      if (!c) continue;
      if (role == TL_ROLE_LAUNCH)
        snprintf(why, sizeof why, "launch thread of GPU %d: core %d (node %d): %s", g,
                 c->core->index, c->core->numa_node, rule);
      else if (g >= 0)
        snprintf(why, sizeof why, "loader %d of GPU %d: core %d (node %d): %s", rank, g,
                 c->core->index, c->core->numa_node, rule);
      else
        snprintf(why, sizeof why, "loader %d: core %d (node %d): %s", rank, c->core->index,
                 c->core->numa_node, rule);
      if (role == TL_ROLE_LAUNCH) c->reserved = 1;
      int err = tl__plan_push(pl, p, role, g, rank, c, why);
      if (err) return err;
      placed[gi] = 1;
    }
  return 0;
}

/* Light threads (main, io): an unreserved core with no thread, else with no hot thread, else
 * the least loaded unreserved core, else any. */
static tl__cand_t* tl__pick_light(tl__planner_t* p, int gpu, const char** rule) {
  tl__cand_t* c = tl__pick(p, gpu, gpu >= 0 ? LOCAL : ANY, NO_RESERVED, 1);
  if (c && c->total == 0) {
    *rule = gpu >= 0 ? "a free core local to GPU 0" : "a free core";
    return c;
  }
  tl__cand_t* any = tl__pick(p, -1, ANY, NO_RESERVED, 1);
  if (any && any->total == 0) {
    *rule = "a free core";
    return any;
  }
  if (c || any) {
    *rule = "no free core: shares a core without a hot thread";
    return c ? c : any;
  }
  if ((c = tl__pick(p, -1, ANY, NO_RESERVED, 0))) {
    *rule = "no core without a hot thread: shares the least loaded unreserved core";
    return c;
  }
  *rule = "only launch cores exist: shares the least loaded one";
  return tl__pick(p, -1, ANY, ALLOW_RESERVED, 0);
}

static int tl__pass_light(tl_plan_t* pl, tl__planner_t* p, tl_role_t role, int count, int ngpus) {
  char why[224];
  for (int i = 0; i < count; i++) {
    const char* rule;
    /* the main thread usually drives GPU 0's work: near it; I/O serves every GPU: anywhere */
    tl__cand_t* c = tl__pick_light(p, role == TL_ROLE_MAIN && ngpus > 0 ? 0 : -1, &rule);
    if (role == TL_ROLE_MAIN)
      snprintf(why, sizeof why, "main thread: core %d (node %d): %s", c->core->index,
               c->core->numa_node, rule);
    else
      snprintf(why, sizeof why, "I/O thread %d: core %d (node %d): %s (I/O serves every GPU)", i,
               c->core->index, c->core->numa_node, rule);
    int err = tl__plan_push(pl, p, role, -1, i, c, why);
    if (err) return err;
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// tl_plan_init
// ---------------------------------------------------------------------------------------------

/* Maps planned GPU i to a topology GPU index, from the spec's bus ids or in PCI order. */
static int tl__map_gpus(const tl_topo_t* topo, const tl_plan_spec_t* spec, int ngpus, int* map) {
  for (int i = 0; i < ngpus; i++) {
    if (!spec->gpu_bus_ids) {
      map[i] = i;
      continue;
    }
    map[i] = -1;
    for (int j = 0; j < topo->ngpus; j++)
      if (strcasecmp(spec->gpu_bus_ids[i], topo->gpus[j].pci_bus_id) == 0) map[i] = j;
    if (map[i] < 0)
      return tl__fail(TL_ENODEV, "GPU %d (PCI %s) is not in the topology", i, spec->gpu_bus_ids[i]);
  }
  return 0;
}

int tl_plan_init(tl_plan_t** out, const tl_topo_t* topo, const tl_plan_spec_t* spec_in) {
  tl__clear_detail();
  if (!out || !topo) return tl__fail(TL_EINVAL, "tl_plan_init: NULL argument");
  *out = NULL;
  tl_plan_spec_t spec;
  if (spec_in) spec = *spec_in;
  else tl_plan_spec_default(&spec);
  int avail = spec.device_nodes ? spec.ndevice_nodes
              : spec.gpu_bus_ids ? spec.ngpu_bus_ids : topo->ngpus;
  if (spec.gpu_bus_ids && spec.ngpu_bus_ids < 0)
    return tl__fail(TL_EINVAL, "plan: ngpu_bus_ids is negative");
  if (spec.device_nodes && (spec.ndevice_nodes < 0 || spec.gpu_bus_ids))
    return tl__fail(TL_EINVAL, "plan: device_nodes %s", spec.gpu_bus_ids
                    ? "and gpu_bus_ids both given: plan either the topology's GPUs or other devices"
                    : "with a negative count");
  int ngpus = spec.gpus < 0 ? avail : spec.gpus;
  if (ngpus > avail)
    return tl__fail(TL_ENODEV, "plan for %d GPU(s) asked, but %d %s", ngpus, avail,
                    spec.device_nodes ? "device node(s) given"
                    : spec.gpu_bus_ids ? "bus id(s) given" : "GPU(s) are in the topology");
  if (spec.io_threads < 0 || spec.loaders_per_gpu < -1 || spec.gpus < -1)
    return tl__fail(TL_EINVAL, "plan: negative thread count (io_threads %d, loaders_per_gpu %d)",
                    spec.io_threads, spec.loaders_per_gpu);

  int err = 0;
  hwloc_bitmap_t restrict_set = NULL;
  tl_plan_t* pl = calloc(1, sizeof *pl);
  tl__planner_t p = {0};
  int* map = calloc((size_t)(ngpus ? ngpus : 1), sizeof *map);
  p.c = calloc((size_t)topo->ncores, sizeof *p.c);
  p.gl = calloc((size_t)(ngpus ? ngpus : 1), sizeof *p.gl);
  p.gnode = calloc((size_t)(ngpus ? ngpus : 1), sizeof *p.gnode);
  p.gpkg = calloc((size_t)(ngpus ? ngpus : 1), sizeof *p.gpkg);
  /* device_nodes: each device's local PUs are its node's (owned here, freed at the end) */
  hwloc_bitmap_t* node_local = spec.device_nodes
                                   ? calloc((size_t)(ngpus ? ngpus : 1), sizeof *node_local)
                                   : NULL;
  if (!pl || !map || !p.c || !p.gl || !p.gnode || !p.gpkg || (spec.device_nodes && !node_local)) {
    err = tl__fail(TL_ENOMEM, "plan");
    goto done;
  }
  pl->ngpus = ngpus;
  pl->is_this_system = topo->summary.is_this_system;
  if (!spec.device_nodes && (err = tl__map_gpus(topo, &spec, ngpus, map))) goto done;

  if (spec.cpus) {
    restrict_set = hwloc_bitmap_alloc();
    if (!restrict_set || hwloc_bitmap_list_sscanf(restrict_set, spec.cpus) != 0 ||
        hwloc_bitmap_iszero(restrict_set)) {
      err = tl__fail(TL_EINVAL, "plan: cannot parse cpus \"%s\" (write e.g. \"0-7,16\")", spec.cpus);
      goto done;
    }
  }
  /* Usable cores: those with an allowed PU (inside spec.cpus when given). A restricted core
   * is represented by a private copy so its cpuset shrinks to the usable PUs. */
  tl__core_t* shrunk = calloc((size_t)topo->ncores, sizeof *shrunk);
  if (!shrunk) {
    err = tl__fail(TL_ENOMEM, "plan");
    goto done;
  }
  for (int i = 0; i < topo->ncores; i++) {
    shrunk[i] = topo->cores[i];
    shrunk[i].pus = hwloc_bitmap_dup(topo->cores[i].pus);
    if (!shrunk[i].pus) continue;
    if (restrict_set) hwloc_bitmap_and(shrunk[i].pus, shrunk[i].pus, restrict_set);
    if (!hwloc_bitmap_iszero(shrunk[i].pus)) p.c[p.n++].core = &shrunk[i];
  }
  if (p.n == 0) {
    err = tl__fail(TL_EINVAL, "plan: no usable core (cpus \"%s\" and the %d allowed PU(s) do not meet)",
                   spec.cpus ? spec.cpus : "all", topo->summary.allowed_pus);
    goto free_shrunk;
  }
  for (int g = 0; g < ngpus; g++) {
    if (spec.device_nodes) {
      int node = spec.device_nodes[g];
      if (!(node_local[g] = hwloc_bitmap_alloc())) {
        err = tl__fail(TL_ENOMEM, "plan");
        goto free_shrunk;
      }
      for (int i = 0; i < p.n; i++)
        if (node < 0 || p.c[i].core->numa_node == node)
          hwloc_bitmap_or(node_local[g], node_local[g], p.c[i].core->pus);
      p.gl[g] = node_local[g];
      p.gnode[g] = node;
    } else {
      p.gl[g] = topo->gpu_local[map[g]];
      p.gnode[g] = topo->gpus[map[g]].numa_node;
    }
    p.gpkg[g] = -1;
    for (int i = 0; i < p.n && p.gpkg[g] < 0; i++)
      if (hwloc_bitmap_intersects(p.c[i].core->pus, p.gl[g])) p.gpkg[g] = p.c[i].core->package;
  }

  if (ngpus > 0 && (err = tl__round(pl, &p, TL_ROLE_LAUNCH, 0, ngpus))) goto free_shrunk;
  if (spec.main_thread && (err = tl__pass_light(pl, &p, TL_ROLE_MAIN, 1, ngpus))) goto free_shrunk;
  if ((err = tl__pass_light(pl, &p, TL_ROLE_IO, spec.io_threads, ngpus))) goto free_shrunk;
  int per_gpu = spec.loaders_per_gpu;
  if (per_gpu < 0) {
    int hot_free = 0;
    for (int i = 0; i < p.n; i++) hot_free += !p.c[i].reserved && p.c[i].hot == 0;
    per_gpu = hot_free / (ngpus > 0 ? ngpus : 1);
    if (per_gpu < 1) per_gpu = 1;
  }
  for (int r = 0; r < per_gpu && !err; r++) err = tl__round(pl, &p, TL_ROLE_LOADER, r, ngpus);
  if (err) goto free_shrunk;
  tl__fill_counts(pl, &p);
  err = tl__plan_regroup(pl);

free_shrunk:
  for (int i = 0; i < topo->ncores; i++) hwloc_bitmap_free(shrunk[i].pus);
  free(shrunk);
done:
  if (node_local)
    for (int g = 0; g < ngpus; g++) hwloc_bitmap_free(node_local[g]);
  free(node_local);
  hwloc_bitmap_free(restrict_set);
  free(map);
  free(p.c);
  free(p.gl);
  free(p.gnode);
  free(p.gpkg);
  if (err) {
    tl_plan_close(pl);
    return err;
  }
  *out = pl;
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Queries
// ---------------------------------------------------------------------------------------------

int tl_plan_size(const tl_plan_t* plan) { return plan ? plan->nslots : 0; }

int tl_plan_gpus(const tl_plan_t* plan) { return plan ? plan->ngpus : 0; }

int tl_plan_slot(const tl_plan_t* plan, int id, tl_plan_slot_t* out) {
  tl__clear_detail();
  if (!plan || !out) return tl__fail(TL_EINVAL, "tl_plan_slot: NULL argument");
  if (id < 0 || id >= plan->nslots)
    return tl__fail(TL_EINVAL, "slot %d: the plan has %d slot(s)", id, plan->nslots);
  *out = plan->slots[id];
  return 0;
}

static tl__group_t* tl__find_group(const tl_plan_t* plan, tl_role_t role, int gpu) {
  for (int i = 0; i < plan->ngroups; i++)
    if (plan->groups[i].role == role && plan->groups[i].gpu == gpu) return &plan->groups[i];
  return NULL;
}

static int tl__no_group(const tl_plan_t* plan, tl_role_t role, int gpu) {
  if ((role == TL_ROLE_MAIN || role == TL_ROLE_IO) && gpu != -1)
    return tl__fail(TL_EINVAL, "%s threads serve no single GPU: ask with gpu=None (-1)", tl_role_name(role));
  if ((role == TL_ROLE_LAUNCH || role == TL_ROLE_LOADER) && gpu >= plan->ngpus)
    return tl__fail(TL_EINVAL, "GPU %d: the plan covers %d GPU(s)", gpu, plan->ngpus);
  return tl__fail(TL_EINVAL, "the plan has no %s slot for GPU %d", tl_role_name(role), gpu);
}

int tl_plan_find(const tl_plan_t* plan, tl_role_t role, int gpu, int rank, int* id) {
  tl__clear_detail();
  if (!plan || !id) return tl__fail(TL_EINVAL, "tl_plan_find: NULL argument");
  tl__group_t* g = tl__find_group(plan, role, gpu);
  if (!g) return tl__no_group(plan, role, gpu);
  if (rank < 0 || rank >= g->count)
    return tl__fail(TL_EINVAL, "%s %d of GPU %d: the plan has %d", tl_role_name(role), rank, gpu, g->count);
  *id = g->first + rank;
  return 0;
}

int tl_plan_claim(tl_plan_t* plan, tl_role_t role, int gpu, int* id, int* wrapped) {
  tl__clear_detail();
  if (!plan || !id) return tl__fail(TL_EINVAL, "tl_plan_claim: NULL argument");
  tl__group_t* g = tl__find_group(plan, role, gpu);
  if (!g) return tl__no_group(plan, role, gpu);
  unsigned k = atomic_fetch_add_explicit(&g->next, 1, memory_order_relaxed);
  *id = g->first + (int)(k % (unsigned)g->count);
  if (wrapped) *wrapped = k >= (unsigned)g->count;
  return 0;
}

int tl_plan_format(const tl_plan_t* plan, char* buf, size_t cap) {
  tl__clear_detail();
  if (!plan || (!buf && cap)) return tl__fail(TL_EINVAL, "tl_plan_format: NULL argument");
  size_t len = 0;
#define TL__PUT(...)                                                              \
  do {                                                                            \
    int n_ = snprintf(len < cap ? buf + len : NULL, len < cap ? cap - len : 0, __VA_ARGS__); \
    if (n_ > 0) len += (size_t)n_;                                                \
  } while (0)
  int shared = 0;
  for (int i = 0; i < plan->nslots; i++) shared += plan->slots[i].hot_on_core > 1 && tl__role_is_hot(plan->slots[i].role);
  TL__PUT("placement plan: %d thread(s), %d GPU(s)%s\n", plan->nslots, plan->ngpus,
          shared ? ", some hot threads share cores (too few cores)" : "");
  for (int i = 0; i < plan->nslots; i++) {
    const tl_plan_slot_t* s = &plan->slots[i];
    char who[32];
    if (s->gpu >= 0) snprintf(who, sizeof who, "%s gpu%d #%d", tl_role_name(s->role), s->gpu, s->rank);
    else snprintf(who, sizeof who, "%s #%d", tl_role_name(s->role), s->rank);
    TL__PUT("  %-18s core %-4d PUs %-10s  %s\n", who, s->core, s->cpus, s->why);
  }
#undef TL__PUT
  if (cap) buf[len < cap ? len : cap - 1] = '\0';
  return (int)len;
}

// ---------------------------------------------------------------------------------------------
// For pin.c
// ---------------------------------------------------------------------------------------------

int tl__plan_slot_pus(const tl_plan_t* plan, int id, hwloc_const_bitmap_t* pus, int* this_system) {
  if (!plan || id < 0 || id >= plan->nslots)
    return tl__fail(TL_EINVAL, "slot %d: the plan has %d slot(s)", id, plan ? plan->nslots : 0);
  *pus = plan->slot_pus[id];
  *this_system = plan->is_this_system;
  return 0;
}
