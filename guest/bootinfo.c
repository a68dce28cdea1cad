/* bootinfo.c -- read the boot-information block (docs/boot-protocol.md), or build one from Xen PVH's
 * hvm_start_info. The block comes from the VMM: check every count before use. */
#include "kernel.h"

struct bootinfo boot;

int bootinfo_copy(const struct bootinfo *src)
{
    if (src->magic != BOOTINFO_MAGIC) {
        printf("boot: bad boot-info magic %x (want %x): booted by an unknown loader\n", src->magic,
               BOOTINFO_MAGIC);
        return -1;
    }
    if (src->version != 1)
        printf("boot: boot-info version %u, this kernel knows 1: reading the version-1 fields\n",
               src->version);
    if (src->nr_memmap == 0 || src->nr_memmap > MAX_MEMMAP) {
        printf("boot: nr_memmap %u out of range 1..%u\n", src->nr_memmap, MAX_MEMMAP);
        return -1;
    }
    /* fixed-size header, then only the entries the count allows */
    memcpy(&boot, src, 40 + src->nr_memmap * sizeof(struct memmap_entry));
    if (boot.cmdline_len > 4095)
        boot.cmdline_len = 4095;
    return 0;
}

/* Xen's hvm_start_info (arch-x86/hvm/start_info.h), version 1 */
struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};
#define HVM_START_MAGIC 0x336ec578u

/* called from pvh_start64 before .bss is zeroed: touch only the arguments */
void pvh_convert(u64 start_info, struct bootinfo *out)
{
    const struct hvm_start_info *si = (const void *)start_info;
    out->magic = 0; /* left invalid if the start info is unusable: bootinfo_copy then says why */
    if (si->magic != HVM_START_MAGIC || si->version < 1 || !si->memmap_paddr)
        return;
    const struct memmap_entry *m = (const void *)si->memmap_paddr;
    u32 n = si->memmap_entries < MAX_MEMMAP ? si->memmap_entries : MAX_MEMMAP;
    for (u32 i = 0; i < n; i++)
        out->memmap[i] = m[i];
    out->version = 1;
    out->vp_count = 1;
    out->nr_memmap = n;
    out->cmdline_gpa = si->cmdline_paddr;
    out->cmdline_len = 0;
    if (si->cmdline_paddr) {
        const char *c = (const char *)si->cmdline_paddr;
        while (out->cmdline_len < 4095 && c[out->cmdline_len])
            out->cmdline_len++;
    }
    out->flags = 0;
    out->tsc_khz = 0;
    out->magic = BOOTINFO_MAGIC;
}
