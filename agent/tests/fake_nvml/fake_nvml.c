/*
 * A fake libnvidia-ml.so.1 for the agent's tests: the real NvmlProbe loads
 * it through nvml-wrapper exactly as it loads NVIDIA's library.
 *
 * State: the file "<path of this library>.state", re-read on every call so
 * a test can change it while the agent runs (write a temporary file and
 * rename it over). One directive per line, "key=value" fields:
 *
 *   init code=0                 nvmlInit_v2 returns this code
 *   count code=0                nvmlDeviceGetCount_v2 returns this code
 *   gpu uuid=GPU-a name=Fake total=81920 used=512 util=10 temp=40
 *       ecc=0 lost=0 register=0 mig=0 procs=0
 *                               util/temp -1: NotSupported; ecc: volatile
 *                               uncorrected count; lost=1: GPU_IS_LOST;
 *                               register: code nvmlDeviceRegisterEvents
 *                               returns; mig=1: MIG mode on; procs=-1:
 *                               compute processes NotSupported
 *   mig uuid=MIG-a total=9728 used=0
 *                               a MIG instance of the last gpu line
 *   xid gpu=0 value=13          one Xid event on GPU 0, delivered once
 *   proc gpu=0 pid=4242 used=3000
 *                               a compute process on GPU 0 holding 3000 MiB
 *                               (listed by nvmlDeviceGetComputeRunningProcesses_v3;
 *                               MIG instances answer NotSupported)
 *
 * Calls are appended to "<path>.calls" ("init", "shutdown") so tests can see
 * retries and the shutdown at exit. Built with -DFAKE_NO_MEMORY_V2 it lacks
 * nvmlDeviceGetMemoryInfo_v2, like drivers before R510.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
enum {
    OK = 0,
    UNINITIALIZED = 1,
    INVALID_ARG = 2,
    NOT_SUPPORTED = 3,
    NOT_FOUND = 6,
    INSUFFICIENT_SIZE = 7,
    TIMEOUT = 10,
    GPU_IS_LOST = 15,
};

#define MAX_GPUS 16
#define MAX_MIGS 7
#define MAX_XIDS 64
#define MAX_PROCS 64
#define CRITICAL_XID 8ULL

struct mig {
    char uuid[96];
    unsigned long long total, used;
};

struct gpu {
    char uuid[96], name[96];
    unsigned long long total, used;
    long util, temp;
    unsigned long long ecc;
    int lost, register_code, mig_mode, mig_count, procs_supported;
    struct mig migs[MAX_MIGS];
};

struct xid {
    int gpu;
    unsigned long long value;
};

struct proc {
    int gpu;
    unsigned pid;
    unsigned long long used;
};

struct state {
    int init_code, count_code;
    int gpu_count;
    struct gpu gpus[MAX_GPUS];
    int xid_count;
    struct xid xids[MAX_XIDS];
    int proc_count;
    struct proc procs[MAX_PROCS];
};

/* Handles are addresses in these arrays: stable across re-reads. */
static char gpu_handles[MAX_GPUS];
static char mig_handles[MAX_GPUS][MAX_MIGS];
static int xid_delivered[MAX_XIDS];
static unsigned long long set_gpus[MAX_GPUS * 4];
static int set_count;
static int initialised;
static struct state st;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static const char *self_path(void) {
    static char path[4096];
    Dl_info info;
    if (!path[0] && dladdr((void *)&self_path, &info) && info.dli_fname) {
        snprintf(path, sizeof path, "%s", info.dli_fname);
    }
    return path;
}

static void record(const char *what) {
    char path[4200];
    snprintf(path, sizeof path, "%s.calls", self_path());
    FILE *f = fopen(path, "a");
    if (f) {
        fprintf(f, "%s\n", what);
        fclose(f);
    }
}

static const char *field(const char *line, const char *key, char *out, size_t n) {
    char pattern[64];
    snprintf(pattern, sizeof pattern, " %s=", key);
    const char *at = strstr(line, pattern);
    if (!at) return NULL;
    at += strlen(pattern);
    size_t len = strcspn(at, " \t\r\n");
    if (len >= n) len = n - 1;
    memcpy(out, at, len);
    out[len] = 0;
    return out;
}

static long long num(const char *line, const char *key, long long fallback) {
    char buf[64];
    return field(line, key, buf, sizeof buf) ? strtoll(buf, NULL, 10) : fallback;
}

static void load(void) {
    char path[4200], line[1024];
    memset(&st, 0, sizeof st);
    snprintf(path, sizeof path, "%s.state", self_path());
    FILE *f = fopen(path, "r");
    if (!f) {
        st.init_code = 9; /* DRIVER_NOT_LOADED */
        return;
    }
    while (fgets(line, sizeof line, f)) {
        char padded[1040];
        snprintf(padded, sizeof padded, " %s", line);
        if (strncmp(line, "init", 4) == 0) {
            st.init_code = (int)num(padded, "code", 0);
        } else if (strncmp(line, "count", 5) == 0) {
            st.count_code = (int)num(padded, "code", 0);
        } else if (strncmp(line, "gpu", 3) == 0 && st.gpu_count < MAX_GPUS) {
            struct gpu *g = &st.gpus[st.gpu_count++];
            if (!field(padded, "uuid", g->uuid, sizeof g->uuid))
                snprintf(g->uuid, sizeof g->uuid, "GPU-fake-%d", st.gpu_count - 1);
            if (!field(padded, "name", g->name, sizeof g->name))
                snprintf(g->name, sizeof g->name, "Fake GPU");
            g->total = (unsigned long long)num(padded, "total", 24576);
            g->used = (unsigned long long)num(padded, "used", 0);
            g->util = (long)num(padded, "util", 0);
            g->temp = (long)num(padded, "temp", 40);
            g->ecc = (unsigned long long)num(padded, "ecc", 0);
            g->lost = (int)num(padded, "lost", 0);
            g->register_code = (int)num(padded, "register", 0);
            g->mig_mode = (int)num(padded, "mig", 0);
            g->procs_supported = num(padded, "procs", 0) >= 0;
        } else if (strncmp(line, "proc", 4) == 0 && st.proc_count < MAX_PROCS) {
            struct proc *p = &st.procs[st.proc_count++];
            p->gpu = (int)num(padded, "gpu", 0);
            p->pid = (unsigned)num(padded, "pid", 0);
            p->used = (unsigned long long)num(padded, "used", 0);
        } else if (strncmp(line, "mig", 3) == 0 && st.gpu_count > 0) {
            struct gpu *g = &st.gpus[st.gpu_count - 1];
            if (g->mig_count >= MAX_MIGS) continue;
            struct mig *m = &g->migs[g->mig_count++];
            if (!field(padded, "uuid", m->uuid, sizeof m->uuid))
                snprintf(m->uuid, sizeof m->uuid, "MIG-fake-%d-%d", st.gpu_count - 1, g->mig_count - 1);
            m->total = (unsigned long long)num(padded, "total", 9728);
            m->used = (unsigned long long)num(padded, "used", 0);
        } else if (strncmp(line, "xid", 3) == 0 && st.xid_count < MAX_XIDS) {
            st.xids[st.xid_count].gpu = (int)num(padded, "gpu", 0);
            st.xids[st.xid_count].value = (unsigned long long)num(padded, "value", 79);
            st.xid_count++;
        }
    }
    fclose(f);
}

/* Resolves a handle after re-reading the state: the GPU (and MIG instance,
 * or NULL) it stands for, or an error code. */
static nvmlReturn_t resolve(void *handle, struct gpu **gpu, struct mig **mig) {
    if (!initialised) return UNINITIALIZED;
    load();
    char *h = handle;
    *mig = NULL;
    if (h >= gpu_handles && h < gpu_handles + MAX_GPUS) {
        int i = (int)(h - gpu_handles);
        if (i >= st.gpu_count) return INVALID_ARG;
        *gpu = &st.gpus[i];
    } else if (h >= &mig_handles[0][0] && h < &mig_handles[0][0] + MAX_GPUS * MAX_MIGS) {
        int at = (int)(h - &mig_handles[0][0]);
        int i = at / MAX_MIGS, j = at % MAX_MIGS;
        if (i >= st.gpu_count || j >= st.gpus[i].mig_count) return INVALID_ARG;
        *gpu = &st.gpus[i];
        *mig = &st.gpus[i].migs[j];
    } else {
        return INVALID_ARG;
    }
    return (*gpu)->lost ? GPU_IS_LOST : OK;
}

#define DEVICE_CALL(handle)                                   \
    struct gpu *g;                                            \
    struct mig *m;                                            \
    pthread_mutex_lock(&lock);                                \
    nvmlReturn_t rc = resolve((handle), &g, &m);              \
    if (rc != OK) {                                           \
        pthread_mutex_unlock(&lock);                          \
        return rc;                                            \
    }

#define DONE(code)                 \
    do {                           \
        pthread_mutex_unlock(&lock); \
        return (code);             \
    } while (0)

static void copy(char *out, unsigned n, const char *text) {
    if (n == 0) return;
    snprintf(out, n, "%s", text);
}

nvmlReturn_t nvmlInit_v2(void) {
    pthread_mutex_lock(&lock);
    record("init");
    load();
    nvmlReturn_t rc = st.init_code;
    if (rc == OK) initialised = 1;
    DONE(rc);
}

nvmlReturn_t nvmlInitWithFlags(unsigned flags) {
    (void)flags;
    return nvmlInit_v2();
}

nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    record("shutdown");
    initialised = 0;
    DONE(OK);
}

const char *nvmlErrorString(nvmlReturn_t rc) {
    switch (rc) {
    case OK: return "Success";
    case UNINITIALIZED: return "Uninitialized";
    case INVALID_ARG: return "Invalid Argument";
    case NOT_SUPPORTED: return "Not Supported";
    case NOT_FOUND: return "Not Found";
    case 9: return "Driver Not Loaded";
    case GPU_IS_LOST: return "GPU is lost";
    case 18: return "RM has detected an NVML/RM version mismatch";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned length) {
    copy(version, length, "550.54.15");
    return OK;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *count) {
    pthread_mutex_lock(&lock);
    if (!initialised) DONE(UNINITIALIZED);
    load();
    if (st.count_code) DONE(st.count_code);
    *count = (unsigned)st.gpu_count;
    DONE(OK);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned index, void **device) {
    pthread_mutex_lock(&lock);
    if (!initialised) DONE(UNINITIALIZED);
    load();
    if (index >= (unsigned)st.gpu_count) DONE(INVALID_ARG);
    *device = &gpu_handles[index];
    DONE(OK);
}

nvmlReturn_t nvmlDeviceGetIndex(void *device, unsigned *index) {
    DEVICE_CALL(device);
    *index = (unsigned)(g - st.gpus);
    DONE(OK);
}

nvmlReturn_t nvmlDeviceGetUUID(void *device, char *uuid, unsigned length) {
    DEVICE_CALL(device);
    copy(uuid, length, m ? m->uuid : g->uuid);
    DONE(OK);
}

nvmlReturn_t nvmlDeviceGetName(void *device, char *name, unsigned length) {
    DEVICE_CALL(device);
    char text[128];
    snprintf(text, sizeof text, m ? "%s MIG" : "%s", g->name);
    copy(name, length, text);
    DONE(OK);
}

static void memory(struct gpu *g, struct mig *m, unsigned long long *total,
                   unsigned long long *used) {
    const unsigned long long mib = 1024ULL * 1024ULL;
    *total = (m ? m->total : g->total) * mib;
    *used = (m ? m->used : g->used) * mib;
}

struct memory_v1 {
    unsigned long long total, free, used;
};

nvmlReturn_t nvmlDeviceGetMemoryInfo(void *device, struct memory_v1 *out) {
    DEVICE_CALL(device);
    memory(g, m, &out->total, &out->used);
    out->free = out->total - out->used;
    DONE(OK);
}

#ifndef FAKE_NO_MEMORY_V2
struct memory_v2 {
    unsigned version;
    unsigned long long total, reserved, free, used;
};

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(void *device, struct memory_v2 *out) {
    DEVICE_CALL(device);
    memory(g, m, &out->total, &out->used);
    out->reserved = 0;
    out->free = out->total - out->used;
    DONE(OK);
}
#endif

/* nvmlProcessInfo_t (v2 layout), what the _v3 call fills. */
struct process_info {
    unsigned pid;
    unsigned long long used;
    unsigned gpu_instance, compute_instance;
};

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(void *device, unsigned *count,
                                                     struct process_info *infos) {
    DEVICE_CALL(device);
    if (m || !g->procs_supported) DONE(NOT_SUPPORTED);
    int gpu = (int)(g - st.gpus);
    unsigned n = 0;
    for (int i = 0; i < st.proc_count; i++) n += st.procs[i].gpu == gpu;
    if (n == 0) {
        *count = 0;
        DONE(OK);
    }
    if (!infos || *count < n) {
        *count = n;
        DONE(INSUFFICIENT_SIZE);
    }
    unsigned at = 0;
    for (int i = 0; i < st.proc_count; i++) {
        if (st.procs[i].gpu != gpu) continue;
        infos[at].pid = st.procs[i].pid;
        infos[at].used = st.procs[i].used * 1024ULL * 1024ULL;
        infos[at].gpu_instance = 0xFFFFFFFFu;
        infos[at].compute_instance = 0xFFFFFFFFu;
        at++;
    }
    *count = n;
    DONE(OK);
}

struct utilization {
    unsigned gpu, memory;
};

nvmlReturn_t nvmlDeviceGetUtilizationRates(void *device, struct utilization *out) {
    DEVICE_CALL(device);
    /* As on real hardware, utilisation is not measured per MIG instance
     * nor on a parent GPU in MIG mode. */
    if (m || g->mig_mode || g->util < 0) DONE(NOT_SUPPORTED);
    out->gpu = (unsigned)g->util;
    out->memory = 0;
    DONE(OK);
}

nvmlReturn_t nvmlDeviceGetTemperature(void *device, int sensor, unsigned *out) {
    (void)sensor;
    DEVICE_CALL(device);
    if (m || g->temp < 0) DONE(NOT_SUPPORTED);
    *out = (unsigned)g->temp;
    DONE(OK);
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(void *device, int error_type, int counter_type,
                                         unsigned long long *count) {
    (void)counter_type;
    DEVICE_CALL(device);
    if (m) DONE(NOT_SUPPORTED);
    *count = error_type == 1 ? g->ecc : 0;
    DONE(OK);
}

nvmlReturn_t nvmlDeviceGetMigMode(void *device, unsigned *current, unsigned *pending) {
    DEVICE_CALL(device);
    if (m) DONE(NOT_SUPPORTED);
    *current = (unsigned)g->mig_mode;
    *pending = (unsigned)g->mig_mode;
    DONE(OK);
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(void *device, unsigned *count) {
    DEVICE_CALL(device);
    if (m) DONE(NOT_SUPPORTED);
    *count = MAX_MIGS;
    DONE(OK);
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(void *device, unsigned index, void **mig) {
    DEVICE_CALL(device);
    if (m || !g->mig_mode) DONE(INVALID_ARG);
    if (index >= (unsigned)g->mig_count) DONE(NOT_FOUND);
    *mig = &mig_handles[g - st.gpus][index];
    DONE(OK);
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(void *device, unsigned *is_mig) {
    DEVICE_CALL(device);
    *is_mig = m != NULL;
    DONE(OK);
}

/* Event sets: each remembers the GPUs registered to it (a bitmask). */
nvmlReturn_t nvmlEventSetCreate(void **set) {
    pthread_mutex_lock(&lock);
    if (!initialised) DONE(UNINITIALIZED);
    if (set_count >= MAX_GPUS * 4) DONE(999);
    set_gpus[set_count] = 0;
    *set = &set_gpus[set_count++];
    DONE(OK);
}

nvmlReturn_t nvmlDeviceRegisterEvents(void *device, unsigned long long types, void *set) {
    DEVICE_CALL(device);
    if (m) DONE(NOT_SUPPORTED);
    if (g->register_code != OK) DONE(g->register_code);
    if (types & CRITICAL_XID) *(unsigned long long *)set |= 1ULL << (g - st.gpus);
    DONE(OK);
}

struct event_data {
    void *device;
    unsigned long long type, data;
    unsigned gpu_instance, compute_instance;
};

nvmlReturn_t nvmlEventSetWait_v2(void *set, struct event_data *out, unsigned timeout_ms) {
    (void)timeout_ms;
    pthread_mutex_lock(&lock);
    if (!initialised) DONE(UNINITIALIZED);
    load();
    unsigned long long gpus = *(unsigned long long *)set;
    for (int i = 0; i < st.xid_count; i++) {
        int gpu = st.xids[i].gpu;
        if (xid_delivered[i] || gpu >= st.gpu_count || !(gpus & (1ULL << gpu))) continue;
        xid_delivered[i] = 1;
        memset(out, 0, sizeof *out);
        out->device = &gpu_handles[gpu];
        out->type = CRITICAL_XID;
        out->data = st.xids[i].value;
        DONE(OK);
    }
    DONE(TIMEOUT);
}

nvmlReturn_t nvmlEventSetFree(void *set) {
    pthread_mutex_lock(&lock);
    *(unsigned long long *)set = 0;
    DONE(OK);
}
