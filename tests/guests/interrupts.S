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
    movl $0x1ff, 0xfee000f0
    movl $0x1a, 0xfec00000
    movl $0x41, 0xfec00010
    movl $0x1b, 0xfec00000
    movl $0, 0xfec00010
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
    movl $0, 0xfee000b0
    pop %rax
    iretq
IDT_DATA
