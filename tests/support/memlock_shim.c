/* Test-only LD_PRELOAD shim: this VM withholds CAP_SYS_RESOURCE from root, so
 * stapbpf's attempt to raise RLIMIT_MEMLOCK fails. Kernels >= 5.11 charge BPF
 * memory to the cgroup and do not need the raise, so pretend it worked.
 * The product never uses this; only the tests' stapbpf wrapper does. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/resource.h>

typedef int (*setrlimit_fn)(__rlimit_resource_t, const void *);

static int call_real(const char *name, __rlimit_resource_t res, const void *lim)
{
    setrlimit_fn real = (setrlimit_fn)dlsym(RTLD_NEXT, name);
    return real(res, lim);
}

int setrlimit(__rlimit_resource_t res, const struct rlimit *lim)
{
    return res == RLIMIT_MEMLOCK ? 0 : call_real("setrlimit", res, lim);
}

int setrlimit64(__rlimit_resource_t res, const struct rlimit64 *lim)
{
    return res == RLIMIT_MEMLOCK ? 0 : call_real("setrlimit64", res, lim);
}
