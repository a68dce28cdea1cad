/* apic.c -- interrupt controllers: the 8259 PIC masked, the local APIC timer at HZ, COM1 through the IOAPIC. */
#include "kernel.h"

#define LAPIC ((volatile u32 *)0xFEE00000UL)
#define IOAPIC ((volatile u32 *)0xFEC00000UL)
#define LAPIC_ID 0x20
#define LAPIC_EOI 0xB0
#define LAPIC_SVR 0xF0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LINT0 0x350
#define LAPIC_LINT1 0x360
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3E0
#define LVT_MASKED 0x10000
#define LVT_PERIODIC 0x20000
#define APIC_TIMER_HZ 1000000000UL /* KVM's APIC timer counts at 1 GHz before the divider */
#define UART_PIN 4

volatile u64 ticks;

static void lapic_w(u32 reg, u32 v) { LAPIC[reg / 4] = v; }

static void ioapic_w(u32 reg, u32 v)
{
    IOAPIC[0] = reg;
    IOAPIC[4] = v;
}

void lapic_eoi(void) { lapic_w(LAPIC_EOI, 0); }
u32 lapic_id(void) { return LAPIC[LAPIC_ID / 4] >> 24; }

/* INIT, then STARTUP with the trampoline's page (the in-kernel LAPIC needs none of the waits a
 * physical one does: KVM delivers both at once) */
void lapic_start_ap(u32 apic, u32 trampoline)
{
    lapic_w(LAPIC_ICR_HI, apic << 24);
    lapic_w(LAPIC_ICR_LO, 0x4500); /* INIT, level assert */
    lapic_w(LAPIC_ICR_HI, apic << 24);
    lapic_w(LAPIC_ICR_LO, 0x4600 | (trampoline >> 12)); /* STARTUP, vector = page number */
}

void apic_init(void)
{
    /* without this, IRQ n from the (unprogrammed) 8259 arrives as vector n */
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    apic_cpu_init();
    /* COM1: edge-triggered, active high, fixed delivery to APIC 0 */
    ioapic_w(0x10 + 2 * UART_PIN + 1, 0);
    ioapic_w(0x10 + 2 * UART_PIN, VEC_UART);
    uart_rx_irq(); /* input since uart_init raised its edge while the pin was masked */
}

/* every CPU's own LAPIC (each has its timer: a CPU running a task gets it back HZ times a second) */
void apic_cpu_init(void)
{
    lapic_w(LAPIC_SVR, 0x100 | VEC_SPURIOUS);
    lapic_w(LAPIC_LINT0, LVT_MASKED);
    lapic_w(LAPIC_LINT1, LVT_MASKED);
    lapic_w(LAPIC_TIMER_DIV, 0x3); /* divide by 16 */
    lapic_w(LAPIC_LVT_TIMER, LVT_PERIODIC | VEC_TIMER);
    lapic_w(LAPIC_TIMER_INIT, (u32)(APIC_TIMER_HZ / 16 / HZ));
}
