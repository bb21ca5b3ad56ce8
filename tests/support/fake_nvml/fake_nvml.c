/* A stand-in for the NVIDIA driver's libnvidia-ml.so.1 (test only: no NVIDIA hardware here).
 *
 * Exports the NVML entry points nvml-wrapper resolves for what the agent asks, with the real
 * signatures and return codes. The values come from the file named by FAKE_NVML_CONFIG,
 * read at nvmlInit_v2 and again at every nvmlDeviceGetCount_v2 (once per agent sample), so a
 * test changes them while the agent runs. Lines:
 *   fail_init                        nvmlInit_v2 answers NVML_ERROR_DRIVER_NOT_LOADED
 *   cuda 12040                       nvmlSystemGetCudaDriverVersion_v2
 *   driver 550.54.15                 nvmlSystemGetDriverVersion
 *   gpu TOTAL_MIB USED_MIB UTIL TEMP POWER_MW NAME...   one per GPU; POWER_MW -1: not supported
 *   health INDEX BUS RETIRE_PENDING REMAP_PENDING REMAP_FAILURE   GPU INDEX's PCI bus (decimal;
 *                                    default 16 + INDEX, domain 0, device 0) and its
 *                                    page-retirement and row-remapping state (0 or 1 each)
 *   link INDEX GEN MAX_GEN WIDTH MAX_WIDTH ECC POWER_LIMIT_MW   GPU INDEX's PCIe link (current
 *                                    and max generation and width), ECC mode (1 on, 0 off) and
 *                                    enforced power limit; -1 for any: not supported. GPUs
 *                                    without a link line support none of these calls
 * With FAKE_NVML_LOG set, every successful nvmlInit_v2 and nvmlShutdown appends "init" or
 * "shutdown" to that file, so a test sees when the agent holds the driver open.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_DRIVER_NOT_LOADED 9
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
#define MAX_GPUS 16

typedef struct {
  unsigned long long total_mib, used_mib;
  unsigned int util, temp;
  long long power_mw;
  char name[96];
  unsigned int bus, retire_pending, remap_pending, remap_failure;
  /* -1: NVML_ERROR_NOT_SUPPORTED. */
  long long link_gen, max_link_gen, link_width, max_link_width, ecc, power_limit_mw;
} fake_gpu;

/* nvmlPciInfo_t as nvml.h defines it. */
typedef struct {
  char busIdLegacy[16];
  unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
  char busId[32];
} nvmlPciInfo_t;

typedef struct {
  unsigned int version;
  unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

typedef struct {
  unsigned int gpu, memory;
} nvmlUtilization_t;

static fake_gpu gpus[MAX_GPUS];
static unsigned int gpu_count;
static int cuda_version;
static char driver_version[80] = "550.54.15";
static int fail_init;
static int initialised;

static void load(void) {
  const char *path = getenv("FAKE_NVML_CONFIG");
  FILE *f = path ? fopen(path, "r") : NULL;
  char line[256];
  unsigned int n = 0;
  fail_init = 0;
  if (!f) {
    gpu_count = 0;
    return;
  }
  while (fgets(line, sizeof line, f)) {
    line[strcspn(line, "\n")] = 0;
    if (strncmp(line, "fail_init", 9) == 0) {
      fail_init = 1;
    } else if (sscanf(line, "cuda %d", &cuda_version) == 1) {
    } else if (strncmp(line, "driver ", 7) == 0) {
      snprintf(driver_version, sizeof driver_version, "%.79s", line + 7);
    } else if (strncmp(line, "gpu ", 4) == 0 && n < MAX_GPUS) {
      fake_gpu *g = &gpus[n];
      int used = 0;
      if (sscanf(line + 4, "%llu %llu %u %u %lld %n", &g->total_mib, &g->used_mib, &g->util,
                 &g->temp, &g->power_mw, &used) >= 5) {
        snprintf(g->name, sizeof g->name, "%.95s", line + 4 + used);
        g->bus = 16 + n;
        g->retire_pending = g->remap_pending = g->remap_failure = 0;
        g->link_gen = g->max_link_gen = g->link_width = g->max_link_width = -1;
        g->ecc = g->power_limit_mw = -1;
        n++;
      }
    } else if (strncmp(line, "health ", 7) == 0) {
      unsigned int index, bus, retire, pending, failure;
      if (sscanf(line + 7, "%u %u %u %u %u", &index, &bus, &retire, &pending, &failure) == 5 &&
          index < n) {
        gpus[index].bus = bus;
        gpus[index].retire_pending = retire;
        gpus[index].remap_pending = pending;
        gpus[index].remap_failure = failure;
      }
    } else if (strncmp(line, "link ", 5) == 0) {
      unsigned int index;
      long long v[6];
      if (sscanf(line + 5, "%u %lld %lld %lld %lld %lld %lld", &index, &v[0], &v[1], &v[2], &v[3],
                 &v[4], &v[5]) == 7 &&
          index < n) {
        fake_gpu *g = &gpus[index];
        g->link_gen = v[0];
        g->max_link_gen = v[1];
        g->link_width = v[2];
        g->max_link_width = v[3];
        g->ecc = v[4];
        g->power_limit_mw = v[5];
      }
    }
  }
  fclose(f);
  gpu_count = n;
}

static void note(const char *event) {
  const char *path = getenv("FAKE_NVML_LOG");
  FILE *f = path ? fopen(path, "a") : NULL;
  if (!f) return;
  fprintf(f, "%s\n", event);
  fclose(f);
}

static fake_gpu *gpu_of(void *device) {
  fake_gpu *g = device;
  if (!initialised) return NULL;
  if (g < gpus || g >= gpus + gpu_count) return NULL;
  return g;
}

int nvmlInit_v2(void) {
  load();
  if (fail_init) return NVML_ERROR_DRIVER_NOT_LOADED;
  initialised = 1;
  note("init");
  return NVML_SUCCESS;
}

int nvmlShutdown(void) {
  if (!initialised) return NVML_ERROR_UNINITIALIZED;
  initialised = 0;
  note("shutdown");
  return NVML_SUCCESS;
}

const char *nvmlErrorString(int result) { return result == 0 ? "Success" : "Fake NVML error"; }

int nvmlSystemGetDriverVersion(char *version, unsigned int length) {
  if (!initialised) return NVML_ERROR_UNINITIALIZED;
  if (strlen(driver_version) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
  strcpy(version, driver_version);
  return NVML_SUCCESS;
}

int nvmlSystemGetCudaDriverVersion_v2(int *version) {
  if (!initialised) return NVML_ERROR_UNINITIALIZED;
  if (!version) return NVML_ERROR_INVALID_ARGUMENT;
  *version = cuda_version;
  return NVML_SUCCESS;
}

int nvmlDeviceGetCount_v2(unsigned int *count) {
  if (!initialised) return NVML_ERROR_UNINITIALIZED;
  if (!count) return NVML_ERROR_INVALID_ARGUMENT;
  load();
  *count = gpu_count;
  return NVML_SUCCESS;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **device) {
  if (!initialised) return NVML_ERROR_UNINITIALIZED;
  if (index >= gpu_count || !device) return NVML_ERROR_INVALID_ARGUMENT;
  *device = &gpus[index];
  return NVML_SUCCESS;
}

int nvmlDeviceGetName(void *device, char *name, unsigned int length) {
  fake_gpu *g = gpu_of(device);
  if (!g || !name) return NVML_ERROR_INVALID_ARGUMENT;
  if (strlen(g->name) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
  strcpy(name, g->name);
  return NVML_SUCCESS;
}

int nvmlDeviceGetMemoryInfo_v2(void *device, nvmlMemory_v2_t *memory) {
  fake_gpu *g = gpu_of(device);
  if (!g || !memory) return NVML_ERROR_INVALID_ARGUMENT;
  /* NVML_STRUCT_VERSION(Memory, 2), as the real library checks it. */
  if (memory->version != (unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))
    return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
  memory->total = g->total_mib << 20;
  memory->used = g->used_mib << 20;
  memory->reserved = 0;
  memory->free = memory->total - memory->used;
  return NVML_SUCCESS;
}

int nvmlDeviceGetUtilizationRates(void *device, nvmlUtilization_t *utilization) {
  fake_gpu *g = gpu_of(device);
  if (!g || !utilization) return NVML_ERROR_INVALID_ARGUMENT;
  utilization->gpu = g->util;
  utilization->memory = 0;
  return NVML_SUCCESS;
}

int nvmlDeviceGetTemperature(void *device, int sensor, unsigned int *temp) {
  fake_gpu *g = gpu_of(device);
  if (!g || !temp || sensor != 0) return NVML_ERROR_INVALID_ARGUMENT;
  *temp = g->temp;
  return NVML_SUCCESS;
}

int nvmlDeviceGetPowerUsage(void *device, unsigned int *power_mw) {
  fake_gpu *g = gpu_of(device);
  if (!g || !power_mw) return NVML_ERROR_INVALID_ARGUMENT;
  if (g->power_mw < 0) return NVML_ERROR_NOT_SUPPORTED;
  *power_mw = (unsigned int)g->power_mw;
  return NVML_SUCCESS;
}

int nvmlDeviceGetPciInfo_v3(void *device, nvmlPciInfo_t *pci) {
  fake_gpu *g = gpu_of(device);
  if (!g || !pci) return NVML_ERROR_INVALID_ARGUMENT;
  memset(pci, 0, sizeof *pci);
  pci->bus = g->bus;
  pci->pciDeviceId = 0x233010de;
  snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02x:00.0", g->bus);
  snprintf(pci->busId, sizeof pci->busId, "00000000:%02x:00.0", g->bus);
  return NVML_SUCCESS;
}

int nvmlDeviceGetRetiredPagesPendingStatus(void *device, int *is_pending) {
  fake_gpu *g = gpu_of(device);
  if (!g || !is_pending) return NVML_ERROR_INVALID_ARGUMENT;
  *is_pending = (int)g->retire_pending;
  return NVML_SUCCESS;
}

int nvmlDeviceGetRemappedRows(void *device, unsigned int *corr, unsigned int *unc,
                              unsigned int *is_pending, unsigned int *failure) {
  fake_gpu *g = gpu_of(device);
  if (!g || !corr || !unc || !is_pending || !failure) return NVML_ERROR_INVALID_ARGUMENT;
  *corr = 0;
  *unc = g->remap_failure ? 1 : 0;
  *is_pending = g->remap_pending;
  *failure = g->remap_failure;
  return NVML_SUCCESS;
}

/* The unsigned-int getters below share one shape: a value, or NOT_SUPPORTED when it is -1. */
static int uint_value(void *device, unsigned int *out, size_t field) {
  fake_gpu *g = gpu_of(device);
  long long v;
  if (!g || !out) return NVML_ERROR_INVALID_ARGUMENT;
  v = *(long long *)((char *)g + field);
  if (v < 0) return NVML_ERROR_NOT_SUPPORTED;
  *out = (unsigned int)v;
  return NVML_SUCCESS;
}

int nvmlDeviceGetCurrPcieLinkGeneration(void *device, unsigned int *gen) {
  return uint_value(device, gen, offsetof(fake_gpu, link_gen));
}

int nvmlDeviceGetMaxPcieLinkGeneration(void *device, unsigned int *gen) {
  return uint_value(device, gen, offsetof(fake_gpu, max_link_gen));
}

int nvmlDeviceGetCurrPcieLinkWidth(void *device, unsigned int *width) {
  return uint_value(device, width, offsetof(fake_gpu, link_width));
}

int nvmlDeviceGetMaxPcieLinkWidth(void *device, unsigned int *width) {
  return uint_value(device, width, offsetof(fake_gpu, max_link_width));
}

int nvmlDeviceGetEnforcedPowerLimit(void *device, unsigned int *limit_mw) {
  return uint_value(device, limit_mw, offsetof(fake_gpu, power_limit_mw));
}

/* nvmlEnableState_t: NVML_FEATURE_DISABLED 0, NVML_FEATURE_ENABLED 1; pending = current here. */
int nvmlDeviceGetEccMode(void *device, int *current, int *pending) {
  fake_gpu *g = gpu_of(device);
  if (!g || !current || !pending) return NVML_ERROR_INVALID_ARGUMENT;
  if (g->ecc < 0) return NVML_ERROR_NOT_SUPPORTED;
  *current = *pending = g->ecc ? 1 : 0;
  return NVML_SUCCESS;
}
