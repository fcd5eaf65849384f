/* tests/c/test-topology.c: topology loading on this machine and on recorded servers
 * (tests/data/topologies, copied from ../shared/topologies; see its README). */
#include <sched.h>
#include <stdio.h>
#include <unistd.h>

#include "task.h"
#include "threadloom/threadloom.h"

static tl_topo_t* load(const char* file) {
  char path[512];
  snprintf(path, sizeof path, "%s/topologies/%s", TL_TEST_DATA_DIR, file);
  tl_topo_t* t = NULL;
  ASSERT_OK(tl_topo_init(&t, path));
  ASSERT(t != NULL);
  return t;
}

static int gpus_on_node(tl_topo_t* t, int node) {
  tl_topo_summary_t s;
  ASSERT_OK(tl_topo_summary(t, &s));
  int n = 0;
  for (int i = 0; i < s.gpus; i++) {
    tl_topo_gpu_t g;
    ASSERT_OK(tl_topo_gpu(t, i, &g));
    ASSERT_EQ(g.index, i);
    if (g.numa_node == node) n++;
  }
  return n;
}

TEST_IMPL(topo_this_system) {
  tl_topo_t* t = NULL;
  ASSERT_OK(tl_topo_init(&t, NULL));
  tl_topo_summary_t s;
  ASSERT_OK(tl_topo_summary(t, &s));
  ASSERT(s.pus >= 1);
  ASSERT(s.cores >= 1 && s.cores <= s.pus);
  ASSERT(s.allowed_pus >= 1 && s.allowed_pus <= s.pus);
  ASSERT(s.allowed_cores >= 1 && s.allowed_cores <= s.cores);
  ASSERT(s.numa_nodes >= 1);
  ASSERT(s.packages >= 1);
  /* hwloc honours HWLOC_XMLFILE; only then is this not the running system. */
  if (!getenv("HWLOC_XMLFILE")) ASSERT_EQ(s.is_this_system, 1);
  /* allowed PUs match what the kernel lets this process run on */
  cpu_set_t set;
  ASSERT_EQ(sched_getaffinity(0, sizeof set, &set), 0);
  ASSERT_EQ(s.allowed_pus, CPU_COUNT(&set));
  tl_topo_close(t);
  tl_topo_close(NULL); /* ignored */
  return 0;
}

TEST_IMPL(topo_dgx2) {
  tl_topo_t* t = load("nvidiaDGX2.xml");
  tl_topo_summary_t s;
  ASSERT_OK(tl_topo_summary(t, &s));
  ASSERT_EQ(s.is_this_system, 0);
  ASSERT_EQ(s.packages, 2);
  ASSERT_EQ(s.numa_nodes, 2);
  ASSERT_EQ(s.pus, 4);
  ASSERT_EQ(s.gpus, 16);
  ASSERT_EQ(gpus_on_node(t, 0), 8);
  ASSERT_EQ(gpus_on_node(t, 1), 8);
  tl_topo_gpu_t first, last;
  ASSERT_OK(tl_topo_gpu(t, 0, &first));
  ASSERT_OK(tl_topo_gpu(t, 15, &last));
  ASSERT_STR_EQ(first.pci_bus_id, "0000:34:00.0");
  ASSERT_CONTAINS(first.name, "V100");
  ASSERT(first.local_pus >= 1);
  ASSERT(strcmp(first.pci_bus_id, last.pci_bus_id) < 0); /* PCI bus order */
  ASSERT(strcmp(first.local_cpus, last.local_cpus) != 0); /* different sockets */
  ASSERT_EQ(tl_topo_gpu(t, 16, &first), TL_ENODEV);
  ASSERT_EQ(tl_topo_gpu(t, -1, &first), TL_ENODEV);
  ASSERT_CONTAINS(tl_err_detail(), "16 GPU");
  tl_topo_close(t);
  return 0;
}

TEST_IMPL(topo_power8) {
  tl_topo_t* t = load("power8gpudistances.xml");
  tl_topo_summary_t s;
  ASSERT_OK(tl_topo_summary(t, &s));
  ASSERT_EQ(s.numa_nodes, 2);
  ASSERT_EQ(s.pus, 16);
  ASSERT_EQ(s.gpus, 4);
  ASSERT_EQ(gpus_on_node(t, 0), 2);
  ASSERT_EQ(gpus_on_node(t, 1), 2);
  tl_topo_gpu_t g;
  ASSERT_OK(tl_topo_gpu(t, 0, &g));
  ASSERT_STR_EQ(g.pci_bus_id, "0002:01:00.0");
  ASSERT_CONTAINS(g.name, "P100");
  ASSERT_EQ(g.local_pus, 8);
  tl_topo_close(t);
  return 0;
}

TEST_IMPL(topo_k40_and_amd) {
  /* Three NVIDIA 3D controllers (one with a CUDA device "Tesla K40m") and an AMD GPU, which
   * must not be counted. */
  tl_topo_t* t = load("32em64t-2n8c2t-pci-wholeio.xml");
  tl_topo_summary_t s;
  ASSERT_OK(tl_topo_summary(t, &s));
  ASSERT_EQ(s.packages, 2);
  ASSERT_EQ(s.cores, 16);
  ASSERT_EQ(s.pus, 32);
  ASSERT_EQ(s.gpus, 3);
  int k40 = 0;
  for (int i = 0; i < 3; i++) {
    tl_topo_gpu_t g;
    ASSERT_OK(tl_topo_gpu(t, i, &g));
    ASSERT_EQ(g.local_pus, 16); /* one package's worth */
    if (strstr(g.name, "K40m")) k40++;
  }
  ASSERT_EQ(k40, 1);
  tl_topo_close(t);
  return 0;
}

TEST_IMPL(topo_no_gpu) {
  tl_topo_t* t = load("96em64t-4n4d3ca2co-pci.xml");
  tl_topo_summary_t s;
  ASSERT_OK(tl_topo_summary(t, &s));
  ASSERT_EQ(s.pus, 96);
  ASSERT_EQ(s.numa_nodes, 4);
  ASSERT_EQ(s.gpus, 0);
  tl_topo_gpu_t g;
  ASSERT_EQ(tl_topo_gpu(t, 0, &g), TL_ENODEV);
  tl_topo_close(t);
  return 0;
}

TEST_IMPL(topo_missing_file) {
  tl_topo_t* t = (tl_topo_t*)&t;
  ASSERT_EQ(tl_topo_init(&t, "/nonexistent/topo.xml"), TL_ENOENT);
  ASSERT(t == NULL);
  ASSERT_CONTAINS(tl_err_detail(), "/nonexistent/topo.xml");
  ASSERT_EQ(tl_topo_init(NULL, NULL), TL_EINVAL);
  return 0;
}

TEST_IMPL(topo_bad_xml) {
  char path[] = "/tmp/tl-bad-topoXXXXXX";
  int fd = mkstemp(path);
  ASSERT(fd >= 0);
  const char junk[] = "<?xml version=\"1.0\"?><notatopology>";
  ASSERT_EQ(write(fd, junk, sizeof junk - 1), (int64_t)(sizeof junk - 1));
  close(fd);
  tl_topo_t* t = NULL;
  int err = tl_topo_init(&t, path);
  unlink(path);
  ASSERT_EQ(err, TL_ETOPOLOGY);
  ASSERT(t == NULL);
  ASSERT_CONTAINS(tl_err_detail(), "hwloc_topology");
  return 0;
}

TEST_IMPL(versions) {
  ASSERT_STR_EQ(tl_version_string(), TL_VERSION_STRING);
  ASSERT(tl_hwloc_version() >= 0x20000);
  ASSERT(tl_mimalloc_version() >= 200);
  int a = tl_numa_available();
  ASSERT(a == 0 || a == 1);
  return 0;
}
