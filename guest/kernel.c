/* kernel.c -- kmain: bring the machine up, then the main loop: shell input, else background tasks,
 * else halt until an interrupt. ap_main: an application processor's loop (tasks, else halt). */
#include "kernel.h"

#define PTE_USER 4UL
#define PTE_PS 0x80UL
#define ADDR_MASK 0x000FFFFFFFFFF000UL

volatile u64 paging_gen;

/* Set the user bit on the boot page tables' entries for [base, end), at 2 MiB granularity (the boot
 * tables use 2 MiB pages): a few instructions per 2 MiB, nothing per 4 KiB page. */
void paging_allow_user(u64 base, u64 end)
{
    if (end > MAX_PHYS)
        end = MAX_PHYS;
    u64 *pml4 = (u64 *)(read_cr3() & ADDR_MASK);
    u64 a = base & ~(BLOCK_SIZE - 1);
    while (a < end) {
        u64 gib_end = (a | ((1UL << 30) - 1)) + 1, stop = end < gib_end ? end : gib_end;
        u64 *e4 = &pml4[(a >> 39) & 511];
        if (!(*e4 & 1))
            break;
        *e4 |= PTE_USER;
        u64 *e3 = &((u64 *)(*e4 & ADDR_MASK))[(a >> 30) & 511];
        if (!(*e3 & 1))
            break;
        *e3 |= PTE_USER;
        if (!(*e3 & PTE_PS)) { /* one page directory: a tight loop over its 2 MiB entries */
            u64 *e2 = &((u64 *)(*e3 & ADDR_MASK))[(a >> 21) & 511];
            u64 *e2_end = e2 + ((stop - a + BLOCK_SIZE - 1) >> 21);
            while (e2 < e2_end)
                *e2++ |= PTE_USER;
        }
        a = gib_end;
    }
    paging_gen++; /* the other CPUs drop theirs before they next enter a task */
    write_cr3(read_cr3()); /* drop TLB entries cached without the user bit */
}

#define KSTACK 16384    /* an application processor's kernel stack */
#define RSP0_STACK 8192 /* and its interrupt stack */

struct cpu cpus[MAX_CPUS];
volatile u32 cpus_online;
u64 ap_stack_top[MAX_CPUS]; /* entry.S ap_start64 */
static u64 kernel_end;      /* boot_alloc's next free byte */

void *boot_alloc(u64 bytes)
{
    u64 p = (kernel_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
    kernel_end = p + bytes;
    return (void *)p;
}

/* stacks for the application processors that will be started */
static void ap_stacks_reserve(u32 ncpus)
{
    for (u32 i = 1; i < ncpus; i++) {
        ap_stack_top[i] = (u64)boot_alloc(KSTACK) + KSTACK;
        cpus[i].rsp0_top = (u64)boot_alloc(RSP0_STACK) + RSP0_STACK;
    }
}

/* bytes of RAM from the image up (in the memory-map entry that holds it) */
static u64 ram_above_image(void)
{
    for (u32 i = 0; i < boot.nr_memmap; i++) {
        const struct memmap_entry *e = &boot.memmap[i];
        if (e->type == 1 && e->base <= (u64)_image_start && e->size > (u64)_image_end - e->base)
            return e->base + e->size - (u64)_image_end;
    }
    return 0;
}

/* that RAM must hold what boot_alloc carved too */
static int kernel_ram_ok(void)
{
    if (kernel_end - (u64)_image_end <= ram_above_image())
        return 1;
    printf("halted: the kernel needs RAM up to %lx for %u VPs, and RAM from the image up ends sooner: "
           "give the VM more memory or fewer VPs\n", kernel_end, boot.vp_count);
    return 0;
}

#define TRAMPOLINE 0x8000UL /* below 1 MiB, page-aligned, unused by the boot protocol */
extern char ap_trampoline[], ap_trampoline_end[], ap_trampoline_cr3[]; /* entry.S */

static void cpu_online(u32 index)
{
    struct cpu *c = &cpus[index];
    c->index = index;
    c->task = -1;
    c->online = 1;
    __asm__ volatile("lock incl %0" : "+m"(cpus_online)::"memory");
}

/* An application processor (entry.S ap_start64; index = its LAPIC ID), started by CPU 0 once the
 * kernel is set up: its own TSS and LAPIC timer, then tasks or halt. Only CPU 0 takes device
 * interrupts. */
void ap_main(u32 index)
{
    trap_cpu_init(index, cpus[index].rsp0_top);
    apic_cpu_init();
    cpu_online(index);
    for (;;) {
        cli();
        task_schedule();
    }
}

/* Start the application processors (VP n has LAPIC ID n), all at once: the trampoline needs no
 * stack and each finds its own by its LAPIC ID. CPU 0 waits while they keep coming online (dozens
 * of emulated starts share the host's cores), giving up after a second with none. With interrupts
 * on (CPU 0's timer ends each wait). */
static void start_aps(void)
{
    u32 want = boot.vp_count < MAX_CPUS ? boot.vp_count : MAX_CPUS;
    if (want < 2)
        return;
    memcpy((void *)TRAMPOLINE, ap_trampoline, (u64)(ap_trampoline_end - ap_trampoline));
    *(volatile u32 *)(TRAMPOLINE + (u64)(ap_trampoline_cr3 - ap_trampoline)) = (u32)read_cr3();
    for (u32 i = 1; i < want; i++)
        lapic_start_ap(i, TRAMPOLINE);
    u64 t0 = ticks;
    for (u32 seen = cpus_online; cpus_online < want && ticks - t0 < HZ; sti_hlt())
        if (cpus_online != seen) {
            seen = cpus_online;
            t0 = ticks;
        }
    for (u32 i = 1; i < want; i++)
        if (!cpus[i].online)
            printf("cpu %u did not come online after its startup IPI\n", i);
}

void cpus_show(void)
{
    u32 me = lapic_id();
    printf("cpus: %u online of %u VPs\n", cpus_online, boot.vp_count);
    for (u32 i = 0; i < MAX_CPUS; i++) {
        struct cpu *c = &cpus[i];
        if (!c->online)
            continue;
        const char *kind;
        s32 t = c->task;
        printf("cpu %u: ticks %lu, task runs %lu, ", i, c->ticks, c->task_runs);
        if (i == me)
            puts("running the shell\n");
        else if (t >= 0 && !task_name(t, &kind))
            printf("running task %d (%s)\n", t, kind);
        else
            puts("idle\n");
    }
}

#define MAX_POLLS 8
static void (*polls[MAX_POLLS])(void);
static u32 npolls;

int kernel_add_poll(void (*fn)(void))
{
    if (npolls == MAX_POLLS)
        return -1;
    polls[npolls++] = fn;
    return 0;
}

void kmain(const struct bootinfo *bi)
{
    uart_init();
    trap_init();
    cpu_online(0);
    if (bootinfo_copy(bi)) {
        puts("halted: no usable boot information\n");
        halt_forever();
    }
    apic_init();
    u32 ncpus = boot.vp_count == 0 ? 1 : boot.vp_count < MAX_CPUS ? boot.vp_count : MAX_CPUS;
    kernel_end = (u64)_image_end;
    ap_stacks_reserve(ncpus);
    task_init(ncpus, ram_above_image() / 8); /* a small VM keeps most of its RAM */
    if (!kernel_ram_ok())
        halt_forever();
    paging_allow_user(0, kernel_end); /* the image (tasks' code) and the task table */
    pmm_init(kernel_end);
    sti();
    start_aps();
    cli();
    struct pmm_stats s;
    pmm_stats(&s);
    printf("pyhv guest: %lu MiB RAM, %lu MiB free, %u VP, %u CPU online, timer %u Hz\n", s.visible / 256,
           s.free / 256, boot.vp_count, cpus_online, HZ);
    vmbus_init(); /* the VMBus controller, if the host has one, and its offers */
    dmvsc_init(); /* the Dynamic Memory VSC, if wanted (boot flag) or offered */
    storvsc_init(); /* the page file's disk, if offered */
    paging_init();
    shell_init();
    u64 last_poll = 0;
    for (;;) {
        cli();
        if (ticks - last_poll >= HZ / 2) { /* a lost interrupt edge costs at most half a second */
            last_poll = ticks;
            uart_rx_irq();
        }
        int c;
        while ((c = uart_getc()) >= 0) {
            sti();
            shell_input(c);
            cli();
        }
        sti();
        for (u32 i = 0; i < npolls; i++)
            polls[i]();
        cli();
        if (!uart_rx_pending()) /* input that came during the polls is handled before halting */
            task_schedule();
    }
}
