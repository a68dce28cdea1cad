/* trap.c -- IDT, TSS and the one C entry for every interrupt and exception. */
#include "kernel.h"

struct idt_entry {
    u16 off0, sel;
    u8 ist, attr;
    u16 off1;
    u32 off2, zero;
} __attribute__((packed));

static struct idt_entry idt[256] __attribute__((section(".bss.noinit"), aligned(16))); /* all set in trap_init */
static u32 tss[MAX_CPUS][26] __attribute__((aligned(16)));
extern const u64 stub_table[256];
extern u64 tss_desc[2 * MAX_CPUS];
extern char rsp0_stack_top[]; /* CPU 0's */
static irq_handler_t irq_handlers[256];

int irq_register(u32 vector, irq_handler_t fn)
{
    if (vector < 0x30 || vector >= VEC_SPURIOUS || irq_handlers[vector])
        return -1;
    irq_handlers[vector] = fn;
    return 0;
}

static const char *const exc_names[32] = {
    "divide error", "debug", "NMI", "breakpoint", "overflow", "bound range", "invalid opcode",
    "device not available", "double fault", "coprocessor overrun", "invalid TSS", "segment not present",
    "stack fault", "general protection", "page fault", "reserved", "x87 error", "alignment check",
    "machine check", "SIMD error", "virtualization", "control protection",
};

void trap_init(void)
{
    for (int v = 0; v < 256; v++) {
        u64 a = stub_table[v];
        idt[v].off0 = (u16)a;
        idt[v].sel = 0x10;
        idt[v].ist = 0;
        idt[v].attr = 0x8E; /* present, DPL0, interrupt gate: IF off in handlers */
        idt[v].off1 = (u16)(a >> 16);
        idt[v].off2 = (u32)(a >> 32);
        idt[v].zero = 0;
    }
    trap_cpu_init(0, (u64)rsp0_stack_top);
}

void trap_cpu_init(u32 cpu, u64 rsp0)
{
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr));
    /* rsp0: where the CPU switches stacks on an interrupt from a CPL3 task; no I/O bitmap. A TSS
     * descriptor turns busy when loaded, so every CPU has its own. */
    u64 t = (u64)tss[cpu];
    tss[cpu][1] = (u32)rsp0;
    tss[cpu][2] = (u32)(rsp0 >> 32);
    tss[cpu][25] = 104 << 16;
    tss_desc[2 * cpu] = (104 - 1) | ((t & 0xFFFFFF) << 16) | (0x89UL << 40) | (((t >> 24) & 0xFF) << 56);
    tss_desc[2 * cpu + 1] = t >> 32;
    __asm__ volatile("ltr %w0" ::"r"(0x40 + 16 * cpu));
}

const char *exception_name(u64 vec)
{
    return vec < 32 && exc_names[vec] ? exc_names[vec] : "reserved";
}

void trap(struct frame *f)
{
    int from_user = (f->cs & 3) == 3;
    if (f->vec == VEC_TIMER) {
        struct cpu *c = this_cpu();
        c->ticks++;
        if (c->index == 0)
            ticks++;
        lapic_eoi();
    } else if (f->vec == VEC_UART) {
        uart_rx_irq();
        lapic_eoi();
    } else if (f->vec == VEC_SPURIOUS) {
        return; /* no EOI for the spurious vector */
    } else if (f->vec < 32) {
        if (from_user) {
            task_user_trap(f);
            return;
        }
        printf("\nkernel exception %lu (%s) at rip %lx: cr2 %lx, error code %lx, rsp %lx\n", f->vec,
               exception_name(f->vec), f->rip, read_cr2(), f->err, f->rsp);
        puts("halted\n");
        halt_forever();
    } else {
        if (irq_handlers[f->vec])
            irq_handlers[f->vec](f);
        lapic_eoi(); /* also for a vector nobody programmed: acknowledge and carry on */
    }
    if (from_user)
        task_user_trap(f); /* the kernel gets the CPU back on every interrupt from a task */
}
