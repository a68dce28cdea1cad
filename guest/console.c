/* console.c -- COM1, a 16550A: polled transmit, interrupt-driven receive into a ring, and printf. */
#include <stdarg.h>
#include "kernel.h"

#define COM1 0x3F8
#define RBR 0 /* receive buffer (read) / THR transmit (write) */
#define IER 1
#define FCR 2
#define LCR 3
#define MCR 4
#define LSR 5
#define LSR_DR 0x01
#define LSR_THRE 0x20
#define FIFO_SIZE 16

static volatile u8 rx_ring[256];
static volatile u32 rx_head, rx_tail; /* head written by the interrupt handler, tail by the shell */
static u32 tx_room;                   /* bytes the transmit FIFO takes before LSR must be read again */

void uart_init(void)
{
    outb(COM1 + IER, 0);
    outb(COM1 + LCR, 0x80); /* DLAB: 115200 baud */
    outb(COM1 + 0, 1);
    outb(COM1 + 1, 0);
    outb(COM1 + LCR, 0x03);  /* 8N1 */
    /* Keys typed before this driver ran are input, not noise: keep the receiver off the line
     * (loopback) while switching to FIFO mode, which empties the receiver, and take what it
     * already holds first. */
    outb(COM1 + MCR, 0x10);  /* loopback */
    uart_rx_irq();
    outb(COM1 + FCR, 0x05);  /* FIFOs on (the transmit FIFO cleared) */
    outb(COM1 + MCR, 0x0B);  /* DTR, RTS, OUT2 (gates the IRQ line on a PC), back on the line */
    outb(COM1 + IER, 0x01);  /* interrupt on received data */
    uart_rx_irq();           /* data already waiting raised no edge the IOAPIC could deliver */
}

void uart_rx_irq(void)
{
    while (inb(COM1 + LSR) & LSR_DR) {
        u8 c = inb(COM1 + RBR);
        if (rx_head - rx_tail < sizeof(rx_ring))
            rx_ring[rx_head++ % sizeof(rx_ring)] = c;
    }
}

int uart_rx_pending(void) { return rx_tail != rx_head; }

int uart_getc(void)
{
    if (rx_tail == rx_head)
        return -1;
    return rx_ring[rx_tail++ % sizeof(rx_ring)];
}

/* Any CPU may print (a task's fault on CPU 1 while CPU 0 runs the shell): each putc, puts and printf
 * is atomic, so lines and the prompt stay whole. Interrupts stay on while printing (a long line
 * takes milliseconds of port exits), so the lock is taken again freely by the CPU that holds it (a
 * handler printing inside a print). */
static spinlock_t tx_lock;
static volatile u32 tx_owner = ~0u;

static int tx_acquire(void)
{
    u32 me = lapic_id();
    if (tx_owner == me)
        return 0;
    u64 f = spin_lock(&tx_lock); /* interrupts off between taking it and saying whose it is */
    tx_owner = me;
    irq_restore(f);
    return 1;
}

static void tx_release(int took)
{
    if (!took)
        return;
    tx_owner = ~0u;
    spin_unlock(&tx_lock, 0);
}

/* Hold the console for several calls, so a line printed in pieces is not cut by another CPU's
 * (the lock is per CPU reentrant: the calls inside take it again for free). */
int console_hold(void)
{
    return tx_acquire();
}

void console_release(int held)
{
    tx_release(held);
}

static void put1(char c)
{
    while (!tx_room)
        tx_room = (inb(COM1 + LSR) & LSR_THRE) ? FIFO_SIZE : 0;
    tx_room--;
    outb(COM1, (u8)c);
}

static void emit(char c)
{
    if (c == '\n')
        put1('\r');
    put1(c);
}

static void emit_s(const char *s)
{
    while (*s)
        emit(*s++);
}

void putc(char c)
{
    int took = tx_acquire();
    emit(c);
    tx_release(took);
}

void puts(const char *s)
{
    int took = tx_acquire();
    emit_s(s);
    tx_release(took);
}

static void put_u64(u64 v, u32 base, int width, char pad)
{
    char buf[24];
    int n = 0;
    do {
        u64 d = v % base;
        buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    while (n < width--)
        emit(pad);
    while (n)
        emit(buf[--n]);
}

/* %d %u %x %s %c %% with l/ll and a zero-padded or space-padded width */
void printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int took = tx_acquire();
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            emit(*fmt);
            continue;
        }
        fmt++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*fmt == '0')
            pad = '0', fmt++;
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l')
            lng = 1, fmt++;
        switch (*fmt) {
        case 'd': {
            s64 v = lng ? va_arg(ap, s64) : va_arg(ap, s32);
            if (v < 0) {
                emit('-');
                v = -v;
            }
            put_u64((u64)v, 10, width, pad);
            break;
        }
        case 'u':
            put_u64(lng ? va_arg(ap, u64) : va_arg(ap, u32), 10, width, pad);
            break;
        case 'x':
            put_u64(lng ? va_arg(ap, u64) : va_arg(ap, u32), 16, width, pad);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            emit_s(s ? s : "(null)");
            break;
        }
        case 'c':
            emit((char)va_arg(ap, int));
            break;
        case '%':
            emit('%');
            break;
        default:
            emit('%');
            emit(*fmt);
            if (!*fmt)
                fmt--;
        }
    }
    tx_release(took);
    va_end(ap);
}
