/* cudactx/registry.c: which device backend is selected, and the device objects.
 *
 * Selection happens once per process: THREADLOOM_DEVICES (sim:N[,opts], cuda, none), or
 * tl_devices_select() before anything used devices, or the default on first use (cuda when the
 * CUDA runtime counts at least one GPU, else none). The choice and the reason are kept for
 * tl_devices_backend() (`python -m threadloom info` prints them).
 *
 * Device objects are created on first request and live for the process (as CUDA's primary
 * contexts do); opening one calls the backend's device_open (cuda: retains the primary context
 * through the driver entry point and loads the spin kernel) and reads its properties.
 *
 * Invariants: tl__sel.kind is written once under tl__sel.mu (0 until selected) and read with an
 * acquire load; tl__devs[kind][i] is published with a release store under tl__sel.mu and never
 * changes afterwards; a device's `opened` flag is set under its mutex after props are filled. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cudactx/internal.h"

static struct {
  pthread_mutex_t mu;       /* selection and device creation */
  _Atomic int kind;         /* the selected tl_device_kind_t, 0 before selection */
  char why[320];            /* why it was selected (written before kind) */
  _Atomic(tl_device_t*) devs[3][TL__MAX_DEVICES]; /* [kind - 1][ordinal]: cuda, sim */
} tl__sel = {.mu = PTHREAD_MUTEX_INITIALIZER};

// ---------------------------------------------------------------------------------------------
// Selection
// ---------------------------------------------------------------------------------------------

/* Applies a spec: "cuda", "none" or "sim:...". 0 or TL_EINVAL/TL_EBUSY (sim reconfigured). */
static int tl__parse_spec(const char* spec, int* kind) {
  if (strcmp(spec, "cuda") == 0) *kind = TL_DEVICE_CUDA;
  else if (strcmp(spec, "none") == 0) *kind = TL_DEVICE_NONE;
  else if (strncmp(spec, "sim:", 4) == 0) {
    int err = tl__sim_configure(spec);
    if (err) return err;
    *kind = TL_DEVICE_SIM;
  } else if (strcmp(spec, "sim") == 0) {
    return tl__fail(TL_EINVAL, "'sim' needs a device count: sim:8 (or sim:8,h2d=25GB/s)");
  } else {
    return tl__fail(TL_EINVAL, "'%s' is not a device backend: use cuda, none or sim:N[,option="
                    "value...] (e.g. sim:8,h2d=25GB/s)", spec);
  }
  return 0;
}

/* Selects the default backend if nothing has (tl__sel.mu held). */
static int tl__select_default_locked(void) {
  if (atomic_load(&tl__sel.kind)) return 0;
  const char* env = getenv("THREADLOOM_DEVICES");
  int kind = 0;
  if (env && env[0]) {
    int err = tl__parse_spec(env, &kind);
    if (err) {
      char d[400];
      snprintf(d, sizeof d, "%s", tl_err_detail());
      return tl__fail(err, "THREADLOOM_DEVICES=%s: %s", env, d);
    }
    snprintf(tl__sel.why, sizeof tl__sel.why, "THREADLOOM_DEVICES=%s", env);
  } else {
    int n = 0;
    const tl__dev_api_t* api = tl__cuda_api();
    int err = api->device_count ? tl_cuda_device_count(&n) : TL_ENOSYS;
    if (err == 0) {
      kind = TL_DEVICE_CUDA;
      snprintf(tl__sel.why, sizeof tl__sel.why, "default: the CUDA runtime sees %d GPU(s)", n);
    } else {
      kind = TL_DEVICE_NONE;
      snprintf(tl__sel.why, sizeof tl__sel.why, "default: no usable GPU (%s: %s); "
               "THREADLOOM_DEVICES=sim:N gives simulated devices", tl_err_name(err),
               tl_err_detail());
    }
    tl__clear_detail(); /* choosing none is not a failure */
  }
  atomic_store_explicit(&tl__sel.kind, kind, memory_order_release);
  return 0;
}

/* The selected kind, selecting the default now if needed. 0 + a TL_E* code in *err on failure. */
static int tl__selected(int* err) {
  int kind = atomic_load_explicit(&tl__sel.kind, memory_order_acquire);
  *err = 0;
  if (kind) return kind;
  pthread_mutex_lock(&tl__sel.mu);
  *err = tl__select_default_locked();
  kind = atomic_load(&tl__sel.kind);
  pthread_mutex_unlock(&tl__sel.mu);
  return kind;
}

int tl_devices_select(const char* spec) {
  tl__clear_detail();
  if (!spec) return tl__fail(TL_EINVAL, "tl_devices_select: NULL spec");
  pthread_mutex_lock(&tl__sel.mu);
  int cur = atomic_load(&tl__sel.kind), err = 0;
  if (cur) {
    /* the same choice again is fine; anything else comes too late */
    int same = (cur == TL_DEVICE_CUDA && strcmp(spec, "cuda") == 0) ||
               (cur == TL_DEVICE_NONE && strcmp(spec, "none") == 0) ||
               (cur == TL_DEVICE_SIM && strcmp(spec, tl__sim_spec()) == 0);
    if (!same)
      err = tl__fail(TL_EBUSY, "the device backend is already selected (%s); '%s' must be "
                     "selected before first use (or set THREADLOOM_DEVICES=%s)", tl__sel.why,
                     spec, spec);
  } else {
    int kind;
    err = tl__parse_spec(spec, &kind);
    if (!err) {
      snprintf(tl__sel.why, sizeof tl__sel.why, "selected by tl_devices_select(\"%s\")", spec);
      atomic_store_explicit(&tl__sel.kind, kind, memory_order_release);
    }
  }
  pthread_mutex_unlock(&tl__sel.mu);
  return err;
}

int tl_sim_configure(const char* spec) { return tl__sim_configure(spec); }

int tl_devices_backend(tl_devices_info_t* out) {
  tl__clear_detail();
  if (!out) return tl__fail(TL_EINVAL, "tl_devices_backend: NULL argument");
  memset(out, 0, sizeof *out);
  int err;
  int kind = tl__selected(&err);
  if (err) return err;
  out->kind = (tl_device_kind_t)kind;
  tl__strlcpy(out->name, kind == TL_DEVICE_CUDA ? "cuda" : kind == TL_DEVICE_SIM ? "sim" : "none",
              sizeof out->name);
  tl__strlcpy(out->why, tl__sel.why, sizeof out->why);
  if (kind != TL_DEVICE_NONE && tl_device_count(TL_DEVICE_DEFAULT, &out->count) != 0) {
    out->count = 0;
    tl__clear_detail();
  }
  return 0;
}

const tl__dev_api_t* tl__host_pin_api(void) {
  int err;
  return tl__selected(&err) == TL_DEVICE_SIM ? &tl__sim_api : tl__cuda_api();
}

// ---------------------------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------------------------

/* Resolves TL_DEVICE_DEFAULT; TL_EINVAL for anything not a kind. */
static int tl__resolve(tl_device_kind_t kind, int* out) {
  int err = 0;
  if (kind == TL_DEVICE_DEFAULT) {
    *out = tl__selected(&err);
    return err;
  }
  if (kind != TL_DEVICE_CUDA && kind != TL_DEVICE_SIM && kind != TL_DEVICE_NONE)
    return tl__fail(TL_EINVAL, "device kind %d is not a tl_device_kind_t", (int)kind);
  *out = kind;
  return 0;
}

int tl_device_count(tl_device_kind_t kind, int* count) {
  tl__clear_detail();
  if (!count) return tl__fail(TL_EINVAL, "tl_device_count: NULL argument");
  *count = 0;
  int k = 0, err = tl__resolve(kind, &k);
  if (err) return err;
  switch (k) {
    case TL_DEVICE_NONE: return 0;
    case TL_DEVICE_CUDA: return tl_cuda_device_count(count);
    default: {
      int n = 0, rc = tl__sim_api.device_count(&n);
      if (rc) return tl__dev_error(&tl__sim_api, "sim device count", rc);
      *count = n;
      return 0;
    }
  }
}

/* "0-3,8" from a sysfs file, or "" (a trailing newline removed). */
static void tl__read_line(const char* path, char* out, size_t cap) {
  out[0] = '\0';
  FILE* f = fopen(path, "r");
  if (!f) return;
  if (!fgets(out, (int)cap, f)) out[0] = '\0';
  fclose(f);
  size_t n = strlen(out);
  while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == ' ')) out[--n] = '\0';
}

/* The machine's NUMA node numbers (from sysfs), in order; returns how many (0: unknown). */
static int tl__numa_nodes(int* nodes, int cap) {
  DIR* dir = opendir("/sys/devices/system/node");
  if (!dir) return 0;
  int n = 0;
  struct dirent* de;
  while ((de = readdir(dir)) && n < cap) {
    int id;
    char tail;
    if (sscanf(de->d_name, "node%d%c", &id, &tail) == 1) nodes[n++] = id;
  }
  closedir(dir);
  for (int i = 1; i < n; i++) /* insertion sort: a handful of nodes */
    for (int j = i; j > 0 && nodes[j - 1] > nodes[j]; j--) {
      int t = nodes[j];
      nodes[j] = nodes[j - 1];
      nodes[j - 1] = t;
    }
  return n;
}

static int tl__fill_props(tl_device_t* d) {
  tl_device_props_t* p = &d->props;
  tl_gpu_info_t g;
  memset(p, 0, sizeof *p);
  int rc = d->api->device_info(d->ordinal, &g);
  if (rc) return TL__DEV_ERR(d, "device properties", rc);
  p->kind = d->kind;
  p->index = d->ordinal;
  tl__strlcpy(p->name, g.name, sizeof p->name);
  tl__strlcpy(p->pci_bus_id, g.pci_bus_id, sizeof p->pci_bus_id);
  p->total_mem = g.total_mem;
  p->cc_major = g.cc_major;
  p->cc_minor = g.cc_minor;
  p->sm_count = g.sm_count;
  p->numa_node = -1;
  char path[160], line[256];
  if (d->kind == TL_DEVICE_CUDA && p->pci_bus_id[0]) {
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/numa_node", p->pci_bus_id);
    tl__read_line(path, line, sizeof line);
    if (line[0]) p->numa_node = atoi(line);
    snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/local_cpulist", p->pci_bus_id);
    tl__read_line(path, p->local_cpus, sizeof p->local_cpus);
  } else if (d->kind == TL_DEVICE_SIM) {
    int nodes[256];
    int n = tl__numa_nodes(nodes, 256);
    if (n > 0) p->numa_node = nodes[d->ordinal % n];
  }
  if (p->numa_node >= 0 && !(d->kind == TL_DEVICE_CUDA && p->local_cpus[0])) {
    snprintf(path, sizeof path, "/sys/devices/system/node/node%d/cpulist", p->numa_node);
    tl__read_line(path, p->local_cpus, sizeof p->local_cpus);
  }
  p->priority_least = 0;
  p->priority_greatest = 0;
  if (d->api->priority_range) {
    rc = d->api->priority_range(d->ordinal, &p->priority_least, &p->priority_greatest);
    if (rc) return TL__DEV_ERR(d, "cudaDeviceGetStreamPriorityRange", rc);
  }
  return 0;
}

int tl__device_open(tl_device_t* d) {
  if (atomic_load_explicit(&d->opened, memory_order_acquire)) return 0;
  pthread_mutex_lock(&d->mu);
  int err = 0;
  if (!atomic_load(&d->opened)) {
    if (!d->api->device_open)
      err = tl__fail(TL_ENOSYS, "%s: the \"%s\" backend has no devices", d->name, d->api->name);
    else
      err = TL__DEV_ERR(d, "open device (primary context)", d->api->device_open(d->ordinal));
    if (!err) err = tl__fill_props(d);
    if (!err) atomic_store_explicit(&d->opened, 1, memory_order_release);
  }
  pthread_mutex_unlock(&d->mu);
  return err;
}

int tl_device_get(tl_device_kind_t kind, int index, tl_device_t** out) {
  tl__clear_detail();
  if (!out) return tl__fail(TL_EINVAL, "tl_device_get: NULL argument");
  *out = NULL;
  int k = 0, err = tl__resolve(kind, &k);
  if (err) return err;
  if (k == TL_DEVICE_NONE)
    return tl__fail(TL_ENODEV, "the device backend is none (%s): there are no devices; set "
                    "THREADLOOM_DEVICES=sim:N for simulated ones",
                    kind == TL_DEVICE_DEFAULT ? tl__sel.why : "asked for by kind");
  if (index < 0 || index >= TL__MAX_DEVICES)
    return tl__fail(TL_ENODEV, "device index %d is out of range", index);
  tl_device_t* d = atomic_load_explicit(&tl__sel.devs[k - 1][index], memory_order_acquire);
  if (!d) {
    int n;
    if ((err = tl_device_count((tl_device_kind_t)k, &n)) != 0) {
      if (k == TL_DEVICE_SIM) {
        char dt[400];
        snprintf(dt, sizeof dt, "%s", tl_err_detail());
        return tl__fail(err, "sim:%d: %s", index, dt);
      }
      return err;
    }
    if (index >= n)
      return tl__fail(TL_ENODEV, "%s:%d: %d %s device(s) exist%s", k == TL_DEVICE_CUDA ? "cuda" : "sim",
                      index, n, k == TL_DEVICE_CUDA ? "CUDA" : "sim",
                      k == TL_DEVICE_CUDA ? " (check CUDA_VISIBLE_DEVICES)"
                                          : " (THREADLOOM_DEVICES=sim:N sets how many)");
    pthread_mutex_lock(&tl__sel.mu);
    d = atomic_load(&tl__sel.devs[k - 1][index]);
    if (!d && (d = calloc(1, sizeof *d)) != NULL) {
      d->api = k == TL_DEVICE_CUDA ? tl__cuda_api() : &tl__sim_api;
      d->kind = (tl_device_kind_t)k;
      d->ordinal = index;
      snprintf(d->name, sizeof d->name, "%s:%d", k == TL_DEVICE_CUDA ? "cuda" : "sim", index);
      pthread_mutex_init(&d->mu, NULL);
      atomic_store_explicit(&tl__sel.devs[k - 1][index], d, memory_order_release);
    }
    pthread_mutex_unlock(&tl__sel.mu);
    if (!d) return tl__fail(TL_ENOMEM, "a device record");
  }
  if ((err = tl__device_open(d)) != 0) return err;
  *out = d;
  return 0;
}

int tl_device_props(const tl_device_t* dev, tl_device_props_t* out) {
  if (!dev || !out) return tl__fail(TL_EINVAL, "tl_device_props: NULL argument");
  *out = dev->props;
  return 0;
}

const char* tl_device_name(const tl_device_t* dev) { return dev ? dev->name : "(null)"; }

int tl_device_mem_info(tl_device_t* dev, size_t* free_bytes, size_t* total) {
  tl__clear_detail();
  if (!dev || !free_bytes || !total) return tl__fail(TL_EINVAL, "tl_device_mem_info: NULL argument");
  return TL__DEV_ERR(dev, "cudaMemGetInfo", dev->api->mem_info(dev->ordinal, free_bytes, total));
}

// ---------------------------------------------------------------------------------------------
// Simulated devices' controls
// ---------------------------------------------------------------------------------------------

static int tl__sim_only(tl_device_t* dev, const char* fn) {
  tl__clear_detail();
  if (!dev) return tl__fail(TL_EINVAL, "%s: NULL device", fn);
  if (dev->kind != TL_DEVICE_SIM)
    return tl__fail(TL_EINVAL, "%s: %s is not a simulated device", fn, dev->name);
  return 0;
}

int tl_sim_engine_stats(tl_device_t* dev, tl_engine_t engine, tl_engine_stats_t* out) {
  int err = tl__sim_only(dev, "tl_sim_engine_stats");
  if (err) return err;
  if (!out) return tl__fail(TL_EINVAL, "tl_sim_engine_stats: NULL argument");
  return tl__sim_stats(dev->ordinal, (int)engine, out);
}

int tl_sim_set(tl_device_t* dev, const char* options) {
  int err = tl__sim_only(dev, "tl_sim_set");
  return err ? err : tl__sim_set(dev->ordinal, options);
}

int tl_sim_inject(tl_device_t* dev, tl_sim_fault_t fault, int count) {
  int err = tl__sim_only(dev, "tl_sim_inject");
  if (err) return err;
  if (count < 0) return tl__fail(TL_EINVAL, "tl_sim_inject: count %d < 0", count);
  return tl__sim_inject(dev->ordinal, (int)fault, count);
}

int tl_sim_owner(const void* p, size_t size, tl_device_t** out) {
  tl__clear_detail();
  if (!out) return tl__fail(TL_EINVAL, "tl_sim_owner: NULL argument");
  *out = NULL;
  int i = tl__sim_configured() ? tl__sim_owner_index(p, size) : -1;
  if (i < 0)
    return tl__fail(TL_ENOENT, "tl_sim_owner: %zu bytes at %p are not in a live allocation of a "
                    "sim device", size, p);
  return tl_device_get(TL_DEVICE_SIM, i, out);
}

int tl_sim_recover(tl_device_t* dev) {
  int err = tl__sim_only(dev, "tl_sim_recover");
  return err ? err : tl__sim_recover(dev->ordinal);
}
