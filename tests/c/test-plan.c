/* tests/c/test-plan.c: the placement plan on recorded servers and synthetic machines, and
 * pinning on this machine. */
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <unistd.h>

#include "task.h"
#include "threadloom/threadloom.h"

static tl_topo_t* load_xml(const char* file) {
  char path[512];
  snprintf(path, sizeof path, "%s/topologies/%s", TL_TEST_DATA_DIR, file);
  tl_topo_t* t = NULL;
  ASSERT_OK(tl_topo_init(&t, path));
  return t;
}

static tl_topo_t* load_synthetic(const char* desc) {
  tl_topo_t* t = NULL;
  ASSERT_OK(tl_topo_init_synthetic(&t, desc));
  return t;
}

static tl_plan_t* make_plan(tl_topo_t* t, int gpus, int loaders, int io, const char* cpus) {
  tl_plan_spec_t spec;
  tl_plan_spec_default(&spec);
  spec.gpus = gpus;
  spec.loaders_per_gpu = loaders;
  spec.io_threads = io;
  spec.cpus = cpus;
  tl_plan_t* p = NULL;
  ASSERT_OK(tl_plan_init(&p, t, &spec));
  return p;
}

/* The rules every plan must keep, whatever the machine:
 *  - a GPU's launch and loader threads sit on its NUMA node whenever it has a usable core;
 *  - while usable cores >= hot threads, no two hot threads share a core;
 *  - no loader shares a launch thread's core while some unreserved core exists.
 * Returns the number of hot threads that share a core. */
static int check_rules_on(tl_topo_t* t, tl_plan_t* p, int usable_cores) {
  int n = tl_plan_size(p), hot = 0, shared = 0, launch_cores = 0;
  int is_launch_core[4096] = {0};
  for (int i = 0; i < n; i++) {
    tl_plan_slot_t sl;
    ASSERT_OK(tl_plan_slot(p, i, &sl));
    ASSERT_EQ(sl.id, i);
    ASSERT(sl.cpus[0] != '\0');
    ASSERT(sl.why[0] != '\0');
    ASSERT(sl.core >= 0 && sl.core < 4096);
    if (sl.role == TL_ROLE_LAUNCH) {
      launch_cores += !is_launch_core[sl.core];
      is_launch_core[sl.core] = 1;
    }
    if (sl.role == TL_ROLE_LAUNCH || sl.role == TL_ROLE_LOADER) {
      hot++;
      if (sl.hot_on_core > 1) shared++;
      if (sl.gpu >= 0) {
        tl_topo_gpu_t g;
        ASSERT_OK(tl_topo_gpu(t, sl.gpu, &g));
        if (g.local_pus > 0 && sl.local) ASSERT_EQ(sl.numa_node, g.numa_node);
      }
    }
  }
  int unreserved = usable_cores - launch_cores;
  for (int i = 0; i < n; i++) {
    tl_plan_slot_t sl;
    ASSERT_OK(tl_plan_slot(p, i, &sl));
    if (sl.role == TL_ROLE_LOADER && unreserved > 0 && is_launch_core[sl.core])
      TL_FAIL_AT("loader slot %d on launch core %d although %d cores are unreserved: %s", i,
                 sl.core, unreserved, sl.why);
  }
  if (hot <= usable_cores) ASSERT_EQ(shared, 0);
  return shared;
}

static int check_rules(tl_topo_t* t, tl_plan_t* p) {
  tl_topo_summary_t s;
  ASSERT_OK(tl_topo_summary(t, &s));
  return check_rules_on(t, p, s.allowed_cores);
}

TEST_IMPL(plan_dgx2_scarce_cores) {
  /* 16 GPUs on 2 nodes but (trimmed) only 4 PUs: every rule that can hold must. */
  tl_topo_t* t = load_xml("nvidiaDGX2.xml");
  tl_plan_t* p = make_plan(t, -1, -1, 1, NULL);
  ASSERT_EQ(tl_plan_gpus(p), 16);
  ASSERT(check_rules(t, p) > 0);
  for (int g = 0; g < 16; g++) {
    int id;
    tl_plan_slot_t sl;
    ASSERT_OK(tl_plan_find(p, TL_ROLE_LAUNCH, g, 0, &id));
    ASSERT_OK(tl_plan_slot(p, id, &sl));
    ASSERT_EQ(sl.numa_node, g < 8 ? 0 : 1); /* on its own node even when shared */
    ASSERT_EQ(sl.local, 1);
    ASSERT_OK(tl_plan_find(p, TL_ROLE_LOADER, g, 0, &id)); /* auto gives at least one */
  }
  char buf[8192];
  int len = tl_plan_format(p, buf, sizeof buf);
  ASSERT(len > 0 && len < (int)sizeof buf);
  ASSERT_CONTAINS(buf, "too few cores");
  ASSERT_CONTAINS(buf, "launch gpu15 #0");
  tl_plan_close(p);
  tl_topo_close(t);
  return 0;
}

TEST_IMPL(plan_three_gpus_enough_cores) {
  /* 2 packages x 8 cores x 2 PUs, three NVIDIA GPUs: 3 launch + 9 loaders + main + io = 14 <= 16
   * cores: nobody shares, and every loader is local. */
  tl_topo_t* t = load_xml("32em64t-2n8c2t-pci-wholeio.xml");
  tl_plan_t* p = make_plan(t, 3, 3, 1, NULL);
  ASSERT_EQ(tl_plan_size(p), 14);
  ASSERT_EQ(check_rules(t, p), 0);
  for (int i = 0; i < tl_plan_size(p); i++) {
    tl_plan_slot_t sl;
    ASSERT_OK(tl_plan_slot(p, i, &sl));
    ASSERT_EQ(sl.local, 1);
    ASSERT_EQ(sl.threads_on_core, 1);
    ASSERT(strchr(sl.cpus, ',') != NULL); /* pinned to both PUs of its core */
  }
  tl_plan_close(p);
  tl_topo_close(t);
  return 0;
}

TEST_IMPL(plan_power8_auto_loaders) {
  tl_topo_t* t = load_xml("power8gpudistances.xml");
  tl_plan_t* p = make_plan(t, -1, -1, 1, NULL);
  ASSERT_EQ(tl_plan_gpus(p), 4);
  ASSERT_EQ(check_rules(t, p), 0);
  int id;
  ASSERT_OK(tl_plan_find(p, TL_ROLE_LOADER, 3, 0, &id));
  ASSERT_EQ(tl_plan_find(p, TL_ROLE_LOADER, 4, 0, &id), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "covers 4 GPU");
  tl_plan_close(p);
  tl_topo_close(t);
  return 0;
}

TEST_IMPL(plan_no_gpu_machines) {
  /* the recorded 96-PU box without GPUs, a 2-core CI box, a 224-core two-socket box */
  const char* synth[] = {"pack:1 core:2 pu:1", "pack:2 numa:2 core:56 pu:2"};
  tl_topo_t* ts[3] = {load_xml("96em64t-4n4d3ca2co-pci.xml"), load_synthetic(synth[0]),
                      load_synthetic(synth[1])};
  int cores[3] = {96, 2, 224};
  for (int k = 0; k < 3; k++) {
    tl_topo_summary_t s;
    ASSERT_OK(tl_topo_summary(ts[k], &s));
    ASSERT_EQ(s.cores, cores[k]);
    tl_plan_t* p = make_plan(ts[k], -1, -1, 2, NULL);
    ASSERT_EQ(tl_plan_gpus(p), 0);
    /* auto: one loader per core; main and I/O are light and share */
    ASSERT_EQ(tl_plan_size(p), 1 + 2 + cores[k]);
    ASSERT_EQ(check_rules(ts[k], p), 0);
    tl_plan_close(p);
    /* more loaders than cores: sharing spreads evenly (at most 2 hot per core) */
    p = make_plan(ts[k], 0, cores[k] + cores[k] / 2, 0, NULL);
    for (int i = 0; i < tl_plan_size(p); i++) {
      tl_plan_slot_t sl;
      ASSERT_OK(tl_plan_slot(p, i, &sl));
      ASSERT(sl.hot_on_core <= 2);
    }
    tl_plan_close(p);
    tl_topo_close(ts[k]);
  }
  return 0;
}

TEST_IMPL(plan_restricted_cpus) {
  /* taskset-like restriction to two cores of package 0 on the 3-GPU box */
  tl_topo_t* t = load_xml("32em64t-2n8c2t-pci-wholeio.xml");
  tl_topo_core_t c0, c1;
  ASSERT_OK(tl_topo_core(t, 0, &c0));
  ASSERT_OK(tl_topo_core(t, 1, &c1));
  char cpus[160];
  snprintf(cpus, sizeof cpus, "%s,%s", c0.pus, c1.pus);
  tl_plan_t* p = make_plan(t, 1, 2, 1, cpus);
  ASSERT(check_rules_on(t, p, 2) > 0);
  for (int i = 0; i < tl_plan_size(p); i++) {
    tl_plan_slot_t sl;
    ASSERT_OK(tl_plan_slot(p, i, &sl));
    ASSERT(sl.core == 0 || sl.core == 1);
  }
  int id;
  tl_plan_slot_t launch;
  ASSERT_OK(tl_plan_find(p, TL_ROLE_LAUNCH, 0, 0, &id));
  ASSERT_OK(tl_plan_slot(p, id, &launch));
  ASSERT_EQ(launch.hot_on_core, 1); /* the launch core stays reserved: loaders share the other */
  tl_plan_close(p);
  tl_plan_spec_t spec;
  tl_plan_spec_default(&spec);
  spec.cpus = "1000-1003";
  ASSERT_EQ(tl_plan_init(&p, t, &spec), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "no usable core");
  spec.cpus = "zero-three";
  ASSERT_EQ(tl_plan_init(&p, t, &spec), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "cannot parse");
  tl_topo_close(t);
  return 0;
}

TEST_IMPL(plan_gpu_order_and_errors) {
  tl_topo_t* t = load_xml("nvidiaDGX2.xml");
  tl_plan_t* p = NULL;
  tl_plan_spec_t spec;
  tl_plan_spec_default(&spec);
  spec.gpus = 17;
  ASSERT_EQ(tl_plan_init(&p, t, &spec), TL_ENODEV);
  ASSERT(p == NULL);
  spec.gpus = -1;
  spec.io_threads = -1;
  ASSERT_EQ(tl_plan_init(&p, t, &spec), TL_EINVAL);
  /* CUDA order given by bus id (e.g. CUDA_VISIBLE_DEVICES=15,0): GPU 0 is the last on the bus */
  const char* ids[] = {"0000:E7:00.0", "0000:34:00.0"};
  tl_topo_gpu_t last;
  ASSERT_OK(tl_topo_gpu(t, 15, &last));
  ids[0] = last.pci_bus_id;
  tl_plan_spec_default(&spec);
  spec.gpu_bus_ids = ids;
  spec.ngpu_bus_ids = 2;
  ASSERT_OK(tl_plan_init(&p, t, &spec));
  ASSERT_EQ(tl_plan_gpus(p), 2);
  int id;
  tl_plan_slot_t sl;
  ASSERT_OK(tl_plan_find(p, TL_ROLE_LAUNCH, 0, 0, &id));
  ASSERT_OK(tl_plan_slot(p, id, &sl));
  ASSERT_EQ(sl.numa_node, 1);
  ASSERT_OK(tl_plan_find(p, TL_ROLE_LAUNCH, 1, 0, &id));
  ASSERT_OK(tl_plan_slot(p, id, &sl));
  ASSERT_EQ(sl.numa_node, 0);
  tl_plan_close(p);
  const char* bad[] = {"0000:ff:00.0"};
  spec.gpu_bus_ids = bad;
  spec.ngpu_bus_ids = 1;
  ASSERT_EQ(tl_plan_init(&p, t, &spec), TL_ENODEV);
  ASSERT_CONTAINS(tl_err_detail(), "0000:ff:00.0");
  tl_role_t r;
  ASSERT_OK(tl_role_parse("feeder", &r));
  ASSERT_EQ(r, TL_ROLE_LOADER);
  ASSERT_EQ(tl_role_parse("driver", &r), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "use main, launch");
  tl_topo_close(t);
  return 0;
}

/* Devices the topology does not show (sim devices): planned from their NUMA nodes. On a
 * two-node synthetic box, 8 devices alternating nodes 0 and 1 get each a launch core on their
 * node, reserved from loaders, and their loaders on the same node; on a 2-core box without NUMA
 * nodes every core is local to every device, and the threads share. */
TEST_IMPL(plan_device_nodes) {
  tl_topo_t* t = load_synthetic("pack:2 numa:1 core:12 pu:1");
  int nodes[8] = {0, 1, 0, 1, 0, 1, 0, 1};
  tl_plan_spec_t spec;
  tl_plan_spec_default(&spec);
  spec.device_nodes = nodes;
  spec.ndevice_nodes = 8;
  spec.loaders_per_gpu = 2;
  tl_plan_t* p = NULL;
  ASSERT_OK(tl_plan_init(&p, t, &spec));
  ASSERT_EQ(tl_plan_gpus(p), 8);
  int launch_core[8];
  for (int g = 0; g < 8; g++) {
    int id;
    tl_plan_slot_t sl;
    ASSERT_OK(tl_plan_find(p, TL_ROLE_LAUNCH, g, 0, &id));
    ASSERT_OK(tl_plan_slot(p, id, &sl));
    ASSERT_EQ(sl.numa_node, nodes[g]);
    ASSERT(sl.local);
    launch_core[g] = sl.core;
  }
  for (int g = 0; g < 8; g++)
    for (int r = 0; r < 2; r++) {
      int id;
      tl_plan_slot_t sl;
      ASSERT_OK(tl_plan_find(p, TL_ROLE_LOADER, g, r, &id));
      ASSERT_OK(tl_plan_slot(p, id, &sl));
      ASSERT_EQ(sl.numa_node, nodes[g]);
      ASSERT(sl.local);
      for (int k = 0; k < 8; k++) ASSERT(sl.core != launch_core[k]);
    }
  /* 24 cores for 8 launch + 16 loader threads: nobody shares */
  for (int i = 0; i < tl_plan_size(p); i++) {
    tl_plan_slot_t sl;
    ASSERT_OK(tl_plan_slot(p, i, &sl));
    if (sl.role == TL_ROLE_LAUNCH || sl.role == TL_ROLE_LOADER) ASSERT_EQ(sl.hot_on_core, 1);
  }
  tl_plan_close(p);
  /* more devices asked than given, or both kinds of GPU list: refused */
  spec.gpus = 9;
  ASSERT_EQ(tl_plan_init(&p, t, &spec), TL_ENODEV);
  ASSERT_CONTAINS(tl_err_detail(), "device node(s) given");
  spec.gpus = -1;
  const char* ids[] = {"0000:34:00.0"};
  spec.gpu_bus_ids = ids;
  spec.ngpu_bus_ids = 1;
  ASSERT_EQ(tl_plan_init(&p, t, &spec), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "both given");
  tl_topo_close(t);
  /* a node-less 2-core box (-1 and node 0 alike): 8 launch threads share the 2 cores */
  t = load_synthetic("pack:1 core:2 pu:1");
  int none[8] = {-1, -1, -1, -1, 0, 0, 0, 0};
  tl_plan_spec_default(&spec);
  spec.device_nodes = none;
  spec.ndevice_nodes = 8;
  spec.loaders_per_gpu = 1;
  ASSERT_OK(tl_plan_init(&p, t, &spec));
  ASSERT_EQ(tl_plan_gpus(p), 8);
  for (int g = 0; g < 8; g++) {
    int id;
    tl_plan_slot_t sl;
    ASSERT_OK(tl_plan_find(p, TL_ROLE_LAUNCH, g, 0, &id));
    ASSERT_OK(tl_plan_slot(p, id, &sl));
    ASSERT(sl.local);
    ASSERT(sl.hot_on_core > 1); /* 16 hot threads on 2 cores */
  }
  tl_plan_close(p);
  tl_topo_close(t);
  return 0;
}

// Claims from many threads at once: every slot of the group is handed out equally often.
enum { CLAIM_THREADS = 8, CLAIMS = 400 };
static pthread_barrier_t claim_barrier;
static tl_plan_t* claim_plan;
static int claim_first;
static int claim_counts[CLAIM_THREADS][64];

static void* claim_worker(void* arg) {
  int k = (int)(intptr_t)arg;
  pthread_barrier_wait(&claim_barrier);
  for (int i = 0; i < CLAIMS; i++) {
    int id, wrapped;
    if (tl_plan_claim(claim_plan, TL_ROLE_LOADER, 1, &id, &wrapped) != 0) return (void*)1;
    claim_counts[k][id - claim_first]++;
  }
  return NULL;
}

TEST_IMPL(plan_claim_threads) {
  tl_topo_t* t = load_xml("32em64t-2n8c2t-pci-wholeio.xml");
  claim_plan = make_plan(t, 3, 4, 1, NULL);
  ASSERT_OK(tl_plan_find(claim_plan, TL_ROLE_LOADER, 1, 0, &claim_first));
  ASSERT_EQ(pthread_barrier_init(&claim_barrier, NULL, CLAIM_THREADS), 0);
  pthread_t th[CLAIM_THREADS];
  for (int i = 0; i < CLAIM_THREADS; i++)
    ASSERT_EQ(pthread_create(&th[i], NULL, claim_worker, (void*)(intptr_t)i), 0);
  for (int i = 0; i < CLAIM_THREADS; i++) {
    void* rc;
    pthread_join(th[i], &rc);
    ASSERT(rc == NULL);
  }
  for (int s = 0; s < 4; s++) {
    int total = 0;
    for (int k = 0; k < CLAIM_THREADS; k++) total += claim_counts[k][s];
    ASSERT_EQ(total, CLAIM_THREADS * CLAIMS / 4);
  }
  int id, wrapped;
  ASSERT_OK(tl_plan_claim(claim_plan, TL_ROLE_LOADER, 1, &id, &wrapped));
  ASSERT_EQ(wrapped, 1);
  ASSERT_EQ(tl_plan_claim(claim_plan, TL_ROLE_IO, 0, &id, &wrapped), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "gpu=None");
  tl_plan_close(claim_plan);
  tl_topo_close(t);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Pinning on this machine
// ---------------------------------------------------------------------------------------------

static int affinity_equals(const char* list) {
  char now[256];
  ASSERT_OK(tl_pin_current(now, sizeof now));
  return strcmp(now, list) == 0;
}

static void* pin_worker(void* arg) {
  tl_plan_t* p = arg;
  char before[256];
  ASSERT_OK(tl_pin_current(before, sizeof before));
  for (int id = 0; id < tl_plan_size(p); id++) {
    tl_plan_slot_t sl;
    tl_pin_result_t r;
    ASSERT_OK(tl_plan_slot(p, id, &sl));
    ASSERT_OK(tl_pin_self(p, id, &r));
    ASSERT_STR_EQ(r.cpus, sl.cpus);
    ASSERT(affinity_equals(sl.cpus)); /* what the kernel reports for this thread */
    /* and sched_getaffinity(0) agrees: exactly the slot's PUs */
    cpu_set_t set;
    ASSERT_EQ(sched_getaffinity(0, sizeof set, &set), 0);
    int want = atoi(sl.cpus);
    ASSERT(CPU_ISSET(want, &set));
    if (!strchr(sl.cpus, ',') && !strchr(sl.cpus, '-')) ASSERT_EQ(CPU_COUNT(&set), 1);
  }
  ASSERT_OK(tl_pin_set(before, -1));
  ASSERT(affinity_equals(before));
  return NULL;
}

TEST_IMPL(pin_this_machine) {
  tl_topo_t* t = NULL;
  ASSERT_OK(tl_topo_init(&t, NULL));
  tl_plan_t* p = make_plan(t, 0, 2, 1, NULL);
  tl_topo_close(t); /* the plan does not need it */
  pthread_t th;
  ASSERT_EQ(pthread_create(&th, NULL, pin_worker, p), 0);
  ASSERT_EQ(pthread_join(th, NULL), 0);
  tl_plan_close(p);
  return 0;
}

static pthread_barrier_t tid_barrier;
static volatile int tid_value;

static void* tid_worker(void* arg) {
  (void)arg;
  tid_value = (int)gettid();
  pthread_barrier_wait(&tid_barrier); /* 1: the id is published */
  pthread_barrier_wait(&tid_barrier); /* 2: the main thread has pinned us */
  return NULL;
}

TEST_IMPL(pin_other_thread) {
  tl_topo_t* t = NULL;
  ASSERT_OK(tl_topo_init(&t, NULL));
  tl_plan_t* p = make_plan(t, 0, 2, 0, NULL);
  tl_topo_close(t);
  int id;
  tl_plan_slot_t sl;
  ASSERT_OK(tl_plan_find(p, TL_ROLE_LOADER, -1, 1, &id));
  ASSERT_OK(tl_plan_slot(p, id, &sl));
  ASSERT_EQ(pthread_barrier_init(&tid_barrier, NULL, 2), 0);
  pthread_t th;
  ASSERT_EQ(pthread_create(&th, NULL, tid_worker, NULL), 0);
  pthread_barrier_wait(&tid_barrier);
  tl_pin_result_t r;
  ASSERT_OK(tl_pin_tid(p, id, tid_value, &r));
  cpu_set_t set;
  ASSERT_EQ(sched_getaffinity(tid_value, sizeof set, &set), 0);
  ASSERT(CPU_ISSET(atoi(sl.cpus), &set));
  if (sl.numa_node >= 0) ASSERT_CONTAINS(r.refused, "only a thread itself");
  pthread_barrier_wait(&tid_barrier);
  pthread_join(th, NULL);
  ASSERT_EQ(tl_pin_tid(p, id, 0x3ffffff0, &r), TL_EINVAL); /* no such thread */
  ASSERT_CONTAINS(tl_err_detail(), "no thread");
  ASSERT_EQ(tl_pin_tid(p, id, 0, &r), TL_EINVAL);
  tl_plan_close(p);
  return 0;
}

TEST_IMPL(pin_refusals) {
  char before[256];
  ASSERT_OK(tl_pin_current(before, sizeof before));
  tl_topo_t* t = load_xml("nvidiaDGX2.xml");
  tl_plan_t* p = make_plan(t, 1, 1, 0, NULL);
  tl_pin_result_t r;
  ASSERT_EQ(tl_pin_self(p, 0, &r), TL_EINVAL);
  ASSERT_CONTAINS(tl_err_detail(), "not this machine");
  ASSERT_EQ(tl_pin_self(p, 99, &r), TL_EINVAL);
  ASSERT(affinity_equals(before));
  ASSERT_EQ(tl_pin_set("4000", -1), TL_EINVAL); /* beyond CPU_SETSIZE */
  ASSERT_EQ(tl_pin_set("", -1), TL_EINVAL);
  int rc = tl_pin_set("1023", -1); /* a PU this machine lacks: the kernel refuses */
  ASSERT(rc == TL_EINVAL || rc == TL_EPERM);
  ASSERT_CONTAINS(tl_err_detail(), "refused");
  ASSERT(affinity_equals(before));
  tl_plan_close(p);
  tl_topo_close(t);
  return 0;
}
