/* kernel.h -- types, port and MMIO helpers, and the interfaces between the guest kernel's parts.
 * Everything here runs at CPL0, where this machine's KVM emulates each instruction: keep loops short. */
#ifndef KERNEL_H
#define KERNEL_H

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long s64;
typedef int s32;

#define NULL ((void *)0)
#define PAGE_SIZE 4096UL
#define BLOCK_PAGES 512UL /* pages in a 2 MiB block */
#define BLOCK_SIZE (2UL << 20)
#define MAX_PHYS (64UL << 30) /* the boot page tables identity-map 0..64 GiB */
#define HZ 100
#define MAX_CPUS 64 /* as many as a VM may have VPs (pyhv.worker.config.MAX_VPS) */

static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0,%1" ::"a"(v), "Nd"(p)); }
static inline void outl(u16 p, u32 v) { __asm__ volatile("outl %0,%1" ::"a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ volatile("inb %1,%0" : "=a"(v) : "Nd"(p)); return v; }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }
static inline u64 read_cr2(void) { u64 v; __asm__ volatile("mov %%cr2,%0" : "=r"(v)); return v; }
static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3,%0" : "=r"(v)); return v; }
static inline void write_cr3(u64 v) { __asm__ volatile("mov %0,%%cr3" ::"r"(v) : "memory"); }
#ifndef KERNEL_HOST_TEST
static inline u64 irq_save(void) { u64 f; __asm__ volatile("pushfq; pop %0; cli" : "=r"(f)::"memory"); return f; }
static inline void irq_restore(u64 f) { if (f & 0x200) sti(); }
#else /* tests/guest/pmm_host.c: guest code built as a host library, where cli would fault */
static inline u64 irq_save(void) { return 0; }
static inline void irq_restore(u64 f) { (void)f; }
#endif
/* Spinlocks between CPUs: `xchg` with memory is locked by itself (8 bytes at most: no cmpxchg16b).
 * Interrupts stay off while one is held, so an interrupt handler on the same CPU cannot spin on it. */
typedef struct { volatile u32 v; } spinlock_t;
static inline u64 spin_lock(spinlock_t *l)
{
    u64 f = irq_save();
    for (;;) {
        u32 old = 1;
        __asm__ volatile("xchgl %0,%1" : "+r"(old), "+m"(l->v)::"memory");
        if (!old)
            return f;
        while (l->v) /* read-only wait: no locked cycles while another CPU holds it */
            ;
    }
}
static inline void spin_unlock(spinlock_t *l, u64 f)
{
    __asm__ volatile("" ::: "memory");
    l->v = 0;
    irq_restore(f);
}
/* lowest set bit; bsf is emulated at CPL0, tzcnt/popcnt are not (see check-insns.sh) */
static inline u64 lowest_bit(u64 w) { u64 r; __asm__("bsfq %1,%0" : "=r"(r) : "rm"(w)); return r; }

/* lib.c */
void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);
u64 strlen(const char *s);
int strcmp(const char *a, const char *b);
int parse_u64(const char *s, u64 *out); /* decimal or 0x hex; 0 on success */

/* console.c: COM1 16550 */
void uart_init(void);
void uart_rx_irq(void);  /* drain RBR into the receive ring */
int uart_getc(void);     /* -1 when the ring is empty */
int uart_rx_pending(void);
void putc(char c);
void puts(const char *s);
void printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int console_hold(void);
void console_release(int held);

/* bootinfo.c: the boot-information block of docs/boot-protocol.md */
#define BOOTINFO_MAGIC 0x56485950u
#define MAX_MEMMAP 64
struct memmap_entry { u64 base, size; u32 type, pad; };
struct bootinfo {
    u32 magic, version, vp_count, nr_memmap;
    u64 cmdline_gpa;
    u32 cmdline_len, flags;
    u64 tsc_khz;
    struct memmap_entry memmap[MAX_MEMMAP];
};
extern struct bootinfo boot; /* validated copy */
int bootinfo_copy(const struct bootinfo *src); /* 0 ok, else prints why */

/* apic.c: 8259 masked, LAPIC timer, IOAPIC routes */
#define VEC_TIMER 0x20
#define VEC_UART 0x24
#define VEC_SPURIOUS 0xff
void apic_init(void);     /* the platform's controllers, then this CPU's LAPIC (BSP) */
void apic_cpu_init(void); /* an application processor's own LAPIC: masks and timer */
void lapic_eoi(void);
u32 lapic_id(void);
void lapic_start_ap(u32 apic, u32 trampoline); /* INIT + STARTUP IPI: real mode at trampoline */
extern volatile u64 ticks; /* CPU 0's timer ticks: the kernel's clock */

/* CPUs (kernel.c): CPU 0 boots the kernel, then starts the others (application processors) with
 * INIT/STARTUP IPIs at a real-mode trampoline (entry.S); they run tasks. A CPU's index is its LAPIC ID. */
struct cpu {
    u64 kctx_rsp; /* the kernel's stack pointer while this CPU runs a task (entry.S: run_user) */
    u32 index, online;
    volatile u64 ticks;      /* timer interrupts on this CPU */
    volatile u64 task_runs;  /* times it entered a task */
    volatile s32 task;       /* task it runs now, or -1 */
    u32 last_run;            /* where its round-robin over the tasks continues */
    u64 paging_gen;          /* page-table generation its TLB has seen */
    u64 rsp0_top;            /* its interrupt stack (the TSS's rsp0) */
};
extern struct cpu cpus[MAX_CPUS];
extern volatile u32 cpus_online;
static inline struct cpu *this_cpu(void) { return &cpus[lapic_id() % MAX_CPUS]; }
void cpus_show(void);

/* kernel RAM after the image, carved before pmm_init (which takes what is left): per-CPU stacks and
 * the task table, sized by the VP count. Page-aligned, not zeroed. */
void *boot_alloc(u64 bytes);

/* paging: the boot page tables (found through CR3) get the user bit on the 2 MiB entries CPL3 tasks
 * use: the image (their code) and the memory each task is given */
void paging_allow_user(u64 base, u64 end);
extern volatile u64 paging_gen; /* bumped by paging_allow_user: other CPUs flush their TLB before a task */

/* pmm.c: physical memory in 4 KiB pages, handed out in 2 MiB blocks where it can. Addresses are
 * guest-physical (= virtual: identity map). Nothing is zeroed. All of it runs at CPL0, under one lock
 * (any CPU may call it, interrupts on or off). */
struct pmm_range { u64 base, pages; };
struct pmm_stats { u64 visible, free, committed, ballooned, hot_added; }; /* pages */
void pmm_init(u64 free_from);        /* boot memory map; RAM below free_from is the kernel's */
void pmm_stats(struct pmm_stats *s);
void pmm_commit(u64 pages);          /* promise memory (may exceed free); no pages move */
void pmm_uncommit(u64 pages);
/* up to `pages` free pages, 2 MiB runs first, as <= max_out merged ranges; returns pages taken */
u64 pmm_alloc(u64 pages, struct pmm_range *out, u32 max_out, u32 *nout);
int pmm_free(u64 base, u64 pages);   /* 0, or -1 (nothing changed) if any page is not allocated */
/* RAM added at run time (the VMM has backed it), anywhere below 64 GiB not already RAM */
int pmm_hot_add(u64 base, u64 pages);
u64 pmm_balloon_floor(void);         /* Linux hv_balloon's floor for the current RAM, in pages */
/* take up to max_pages free pages out (2 MiB runs first) keeping floor_pages free */
u64 pmm_balloon_take(u64 max_pages, u64 floor_pages, struct pmm_range *out, u32 max_out, u32 *nout);
int pmm_balloon_give(u64 base, u64 pages); /* 0, or -1 (nothing changed) if not all ballooned */
/* free-page hints: whole free blocks not yet told of, out of the free pool until pmm_hint_done */
u64 pmm_free_gen(void);
u64 pmm_hint_take(struct pmm_range *out, u32 max_out, u32 *nout);
void pmm_hint_done(const struct pmm_range *r, u32 n);
int pmm_first_ballooned_block(u64 *range); /* a hostile hint's ballooned range (host tests) */
u64 pmm_balloon_return(u64 max_pages); /* give back ballooned pages, lowest first (DM starts over) */
u64 pmm_balloon_touch(u64 max_pages); /* write to ballooned pages (a misbehaving guest, for tests) */
/* hot-remove: hot-added memory taken offline (out of RAM until added again), never below a floor */
int pmm_hot_remove_region(u64 base, u64 pages, u64 floor_pages); /* 0, or -1 if not all free */
u64 pmm_hot_remove_blocks(u64 base, u64 pages, u64 max_pages, u64 floor_pages, struct pmm_range *out, u32 max_out,
                          u32 *nout);
int pmm_check(void); /* consistency of counters and bitmaps, for the `pmmcheck` command */

/* trap frame, as pushed by the stubs in entry.S */
struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vec, err, rip, cs, rflags, rsp, ss;
};
void trap_init(void);          /* the IDT (once), then this CPU's tables */
void trap_cpu_init(u32 cpu, u64 rsp0_top); /* load the IDT and this CPU's TSS (its own rsp0 stack) */
void trap(struct frame *f);
/* for drivers (VMBus, DM VSC): a handler for a device interrupt vector (0x30..0xfe; the kernel sends
 * the EOI), and work the main loop runs on every pass (after an interrupt or HZ times a second) */
typedef void (*irq_handler_t)(struct frame *f);
int irq_register(u32 vector, irq_handler_t fn);
int kernel_add_poll(void (*fn)(void));

/* task.c: background tasks at CPL3 */
/* before pmm_init: its table comes from boot_alloc, two slots per CPU within `budget` bytes */
void task_init(u32 cpus, u64 budget);
void task_schedule(void); /* idle path: run a task or halt until an interrupt */
/* cpu: pin the task to that CPU, or -1 to run on any */
int task_start_testlimit(u64 mb, u64 count, s32 cpu);
int task_start_dirty(u64 mb, u64 pps, s32 cpu);
int task_start_read(u64 mb, s32 cpu); /* reads one word a page of MB MiB, again and again */
int task_kill(int id); /* -1: all */
void task_list(void);
void task_user_trap(struct frame *f) __attribute__((noreturn)); /* a trap from CPL3 */
int task_kill_kind_testlimit(void);
int task_name(s32 id, const char **kind); /* 0 and its kind's name if task id exists */
int task_start_fault(s32 cpu); /* a task that reads unmapped memory, on that CPU or any (-1) */
#define FAULT_ADDRESS MAX_PHYS /* just above the identity map: not present */

/* vmbus.c, dmvsc.c: the VMBus client and the Dynamic Memory VSC (vmbus.h has the rest) */
int vmbus_init(void);
void vmbus_show(void);
void dmvsc_init(void);
void dmvsc_show(void);
void dmvsc_command(int argc, char **argv); /* the shell's `dm`: show, reopen, deaf N */

/* storvsc.c: the page file's disk (synthetic storage, docs/storage.md); 512-byte sectors */
#define STORAGE_MAX_PFNS 17 /* 64 KiB per request at any offset */
void storvsc_init(void);
void storvsc_show(void);
u64 storvsc_sectors(void); /* 0: no disk */
/* one synchronous READ/WRITE of `sectors` at `lba` into/from the pages `pfns` (from offset 0): 0 or -1 */
int storvsc_io(int write, u64 lba, u32 sectors, const u64 *pfns, u32 n);
const char *storvsc_status_name(u32 st);
int storvsc_unmap(u64 lba, u32 sectors); /* whole 4 KiB blocks the host may forget: 0 or -1 */

/* paging.c: testlimit tasks' memory in windows of 4 KiB pages above the identity map; LRU pages go to
 * the page file (the storage VSC's disk) when free memory runs out and come back on touch */
#define PAGING_WINDOWS 48 /* task slots that can have a window (8 GiB each, from 64 GiB up) */
struct paging_stats { u64 file_pages, slots_used, page_outs, page_ins, zero_fills, faults, reclaims, failures; };
void paging_init(void);   /* after storvsc_init: paging is on if there is a disk */
int paging_active(void);
u64 paging_window(u32 w, u64 pages);                  /* VA of a new window of `pages`, 0 if none */
void paging_map(u32 w, u64 vpn, u64 pa, u64 pages);    /* resident pages at the window's vpn.. */
int paging_fault(u32 w, u64 va);                       /* page in / zero-fill va: 0, or -1 */
void paging_release(u32 w);                            /* free its frames, page file slots, tables */
u64 paging_reclaim(u64 pages);                         /* page out up to `pages`: freed (task_lock held) */
void paging_window_counts(u32 w, u64 *resident, u64 *swapped);
void paging_get_stats(struct paging_stats *s);
void paging_show(void);
/* task.c, for paging: whether window w's task may lose pages now (not running on another CPU;
 * task_lock held), and the reclaim entry for the memory manager (takes task_lock) */
int task_window_evictable(u32 w);
u64 task_reclaim(u64 pages);
int task_verify(void); /* testlimit tasks with windows check every page's pattern once more */
/* pmm.c: set by paging_init; pmm_balloon_take calls it (no lock held) to page out what it lacks */
extern u64 (*pmm_reclaim_hook)(u64 pages);

/* shell.c */
void shell_init(void);
void shell_input(int c);

/* entry.S */
extern char _image_start[], _image_end[], _bss_start[], _bss_end[];
extern char user_sys[];
u64 run_user(struct frame *f, u64 *kctx_rsp); /* iretq to f; returns when a trap hands control back */
void back_to_kernel(u64 v, u64 *kctx_rsp) __attribute__((noreturn));
void halt_forever(void) __attribute__((noreturn));
void poweroff(u32 code) __attribute__((noreturn));
#endif
