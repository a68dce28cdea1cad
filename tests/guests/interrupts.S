/* Masks the 8259s, enables the LAPIC, routes IOAPIC pin 5 to vector 0x41 (edge), signals
   "ready" on port 0x10, then HLTs with interrupts on. Vectors 0x40 and 0x41 report their
   number on port 0x11 and EOI. */
#include "guest.h"
.code64
.globl _start
_start:
    SET_GATE(0x40, vec40)
    SET_GATE(0x41, vec41)
    lidt idtr(%rip)
    mov $0xff, %al
    outb %al, $0x21
    outb %al, $0xa1
    mov $0xfee00000, %rdi
    movl $0x1ff, 0xf0(%rdi)     /* LAPIC spurious vector register: enable */
    mov $0xfec00000, %rsi
    movl $0x1a, (%rsi)          /* IOAPIC redirection entry 5, low: vector 0x41, edge */
    movl $0x41, 0x10(%rsi)
    movl $0x1b, (%rsi)          /* high: destination APIC 0 */
    movl $0, 0x10(%rsi)
    outb %al, $0x10
    sti
1:  hlt
    jmp 1b
vec40:
    push %rax
    mov $0x40, %eax
    jmp report
vec41:
    push %rax
    mov $0x41, %eax
report:
    outl %eax, $0x11
    movl $0, 0xb0(%rdi)         /* EOI (rdi still holds the LAPIC base) */
    pop %rax
    iretq
IDT_DATA
