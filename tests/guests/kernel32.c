/* kernel32.c -- the C half of the test kernels booted by the published 32-bit entries (Xen PVH,
 * Multiboot v1), not by pyhv's own boot protocol. Each prints what its loader told it on COM1
 * (command line, RAM in the memory map) and powers off through port 0xF4 (pyhv's power-off port,
 * QEMU's isa-debug-exit). Built -m32 with general registers only: CPL0 code is emulated here. */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define COM1 0x3F8
#define LSR_THRE 0x20
#define POWEROFF_PORT 0xF4

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static void putc(char c)
{
    if (c == '\n')
        putc('\r');
    while (!(inb(COM1 + 5) & LSR_THRE))
        ;
    outb(COM1, (u8)c);
}

static void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

static void put_dec(u32 v)
{
    char buf[11];
    int i = 0;
    do {
        buf[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i)
        putc(buf[--i]);
}

static void put_hex(u32 v)
{
    puts("0x");
    for (int shift = 28; shift >= 0; shift -= 4)
        putc("0123456789abcdef"[(v >> shift) & 0xF]);
}

static void __attribute__((noreturn)) poweroff(u8 status)
{
    outb(POWEROFF_PORT, status);
    for (;;)
        __asm__ volatile("cli; hlt");
}

static void report(const char *who, const char *cmdline, u64 ram)
{
    puts(who);
    puts(": cmdline: ");
    puts(cmdline ? cmdline : "(none)");
    puts("\n");
    puts(who);
    puts(": RAM ");
    put_dec((u32)(ram >> 20)); /* a shift, not a 64-bit division (no libgcc here) */
    puts(" MiB\n");
}

/* Xen's public/arch-x86/hvm/start_info.h, version 1. */
struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};
struct hvm_memmap_table_entry {
    u64 addr, size;
    u32 type, reserved;
};

void pvh_main(const struct hvm_start_info *si)
{
    puts("pvh: entered at the PHYS32 entry\n");
    if (si->magic != 0x336EC578) {
        puts("pvh: bad hvm_start_info magic ");
        put_hex(si->magic);
        puts("\n");
        poweroff(2);
    }
    u64 ram = 0;
    if (si->version >= 1) {
        const struct hvm_memmap_table_entry *e = (const void *)(u32)si->memmap_paddr;
        for (u32 i = 0; i < si->memmap_entries && i < 128; i++)
            if (e[i].type == 1)
                ram += e[i].size;
    }
    report("pvh", si->cmdline_paddr ? (const char *)(u32)si->cmdline_paddr : 0, ram);
    poweroff(0);
}

/* The Multiboot 0.6.96 boot information (the fields used here). */
struct multiboot_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    u32 syms[4];
    u32 mmap_length, mmap_addr;
    u32 drives_length, drives_addr, config_table, boot_loader_name;
};
struct multiboot_mmap_entry {
    u32 size;
    u64 base, length;
    u32 type;
} __attribute__((packed));

void multiboot_main(u32 magic, const struct multiboot_info *mbi)
{
    puts("multiboot: entered in protected mode\n");
    if (magic != 0x2BADB002) {
        puts("multiboot: bad EAX ");
        put_hex(magic);
        puts("\n");
        poweroff(2);
    }
    u64 ram = 0;
    if (mbi->flags & (1u << 6)) { /* mmap_*: entries of `size` bytes after the size field */
        u32 at = mbi->mmap_addr, end = mbi->mmap_addr + mbi->mmap_length;
        while (at < end) {
            const struct multiboot_mmap_entry *e = (const void *)at;
            if (e->type == 1)
                ram += e->length;
            at += e->size + 4;
        }
    }
    if (mbi->flags & 1) { /* mem_lower / mem_upper, in KiB */
        puts("multiboot: mem_upper ");
        put_dec(mbi->mem_upper);
        puts(" KiB\n");
    }
    report("multiboot", (mbi->flags & (1u << 2)) ? (const char *)mbi->cmdline : 0, ram);
    poweroff(0);
}
