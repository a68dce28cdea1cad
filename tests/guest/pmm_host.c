/* pmm_host.c -- what guest/pmm.c needs from the rest of the kernel, so the tests can build the
 * physical memory manager as a host shared library and drive it with ctypes (its printf is libc's). */

#include "kernel.h"

struct bootinfo boot;

/* the tests set the memory map, then call pmm_init */
void host_set_memmap(u32 n, const struct memmap_entry *m)
{
    boot.nr_memmap = n;
    for (u32 i = 0; i < n && i < MAX_MEMMAP; i++)
        boot.memmap[i] = m[i];
}

void paging_allow_user(u64 base, u64 end)
{
    (void)base;
    (void)end;
}
