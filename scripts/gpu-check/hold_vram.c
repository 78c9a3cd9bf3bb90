/*
 * hold_vram MIB MS: a stand-in for a model-serving command job. Loads
 * libcuda.so.1 at run time (no CUDA toolkit needed), creates a context on
 * device 0 of what CUDA_VISIBLE_DEVICES shows it, allocates MIB MiB, holds
 * it MS milliseconds and prints one JSON line. With DELAY_MS set it waits
 * that long after the context before allocating (a slow model load).
 * Build: cc -O2 -o hold_vram hold_vram.c -ldl
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef int (*cu_init_t)(unsigned);
typedef int (*cu_device_get_t)(int *, int);
typedef int (*cu_ctx_create_t)(void **, unsigned, int);
typedef int (*cu_mem_alloc_t)(unsigned long long *, size_t);
typedef int (*cu_mem_free_t)(unsigned long long);

static void pause_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static int fail(const char *step, int rc) {
    const char *visible = getenv("CUDA_VISIBLE_DEVICES");
    printf("{\"ok\": false, \"step\": \"%s\", \"cuda_error\": %d, \"visible\": \"%s\"}\n", step, rc,
           visible ? visible : "");
    return 1;
}

int main(int argc, char **argv) {
    long mib = argc > 1 ? atol(argv[1]) : 1024;
    long hold = argc > 2 ? atol(argv[2]) : 2000;
    const char *delay = getenv("DELAY_MS");
    void *cuda = dlopen("libcuda.so.1", RTLD_NOW);
    if (!cuda) return fail("dlopen libcuda.so.1", -1);
    cu_init_t cu_init = (cu_init_t)dlsym(cuda, "cuInit");
    cu_device_get_t cu_device_get = (cu_device_get_t)dlsym(cuda, "cuDeviceGet");
    cu_ctx_create_t cu_ctx_create = (cu_ctx_create_t)dlsym(cuda, "cuCtxCreate_v2");
    cu_mem_alloc_t cu_mem_alloc = (cu_mem_alloc_t)dlsym(cuda, "cuMemAlloc_v2");
    cu_mem_free_t cu_mem_free = (cu_mem_free_t)dlsym(cuda, "cuMemFree_v2");
    if (!cu_init || !cu_device_get || !cu_ctx_create || !cu_mem_alloc || !cu_mem_free)
        return fail("dlsym", -1);
    int rc, device;
    void *context;
    unsigned long long memory;
    if ((rc = cu_init(0))) return fail("cuInit", rc);
    if ((rc = cu_device_get(&device, 0))) return fail("cuDeviceGet", rc);
    if ((rc = cu_ctx_create(&context, 0, device))) return fail("cuCtxCreate", rc);
    if (delay) pause_ms(atol(delay));
    if ((rc = cu_mem_alloc(&memory, (size_t)mib << 20))) return fail("cuMemAlloc", rc);
    pause_ms(hold);
    cu_mem_free(memory);
    const char *visible = getenv("CUDA_VISIBLE_DEVICES");
    const char *index = getenv("LINGUA_GPU_INDEX");
    printf("{\"ok\": true, \"mib\": %ld, \"held_ms\": %ld, \"visible\": \"%s\", \"gpu_index\": \"%s\"}\n",
           mib, hold, visible ? visible : "", index ? index : "");
    return 0;
}
