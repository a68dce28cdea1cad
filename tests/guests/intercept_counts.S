/* Makes exactly as many exits of each kind as its registers say, then powers off:
   r8 OUTs to port 0x10, r9 INs from port 0x11, r10 INs from port 0x12 (nobody intercepts it),
   r11 4-byte MMIO reads at 0xd0000000, r12 4-byte MMIO writes at 0xd0000004, r13 MMIO reads at
   0xe0000000 (no RAM, nobody intercepts it), r14 RDMSR 0x40000000 and as many WRMSR 0x40000001,
   r15 RDMSR 0x40000003 (KVM does not know it and nobody intercepts it: #GP, which the handler
   skips). Counting loops use dec/jnz only (CPL0 code is emulated here). */
#include "guest.h"
.code64
.globl _start
_start:
    SET_GATE(13, gp_handler)
    lidt idtr(%rip)
    mov $0xd0000000, %rbx
    mov $0xe0000000, %rsi
outs:
    test %r8, %r8
    jz ins
    outb %al, $0x10
    dec %r8
    jmp outs
ins:
    test %r9, %r9
    jz unclaimed
    inb $0x11, %al
    dec %r9
    jmp ins
unclaimed:
    test %r10, %r10
    jz mmio_reads
    inb $0x12, %al
    dec %r10
    jmp unclaimed
mmio_reads:
    test %r11, %r11
    jz mmio_writes
    movl (%rbx), %eax
    dec %r11
    jmp mmio_reads
mmio_writes:
    test %r12, %r12
    jz mmio_nowhere
    movl %eax, 4(%rbx)
    dec %r12
    jmp mmio_writes
mmio_nowhere:
    test %r13, %r13
    jz msrs
    movl (%rsi), %eax
    dec %r13
    jmp mmio_nowhere
msrs:
    test %r14, %r14
    jz unknown_msrs
    mov $0x40000000, %ecx
    rdmsr
    mov $0x40000001, %ecx
    wrmsr
    dec %r14
    jmp msrs
unknown_msrs:
    test %r15, %r15
    jz done
    mov $0x40000003, %ecx
    rdmsr
    dec %r15
    jmp unknown_msrs
done:
    POWER_OFF
gp_handler:
    add $8, %rsp            /* the error code */
    addq $2, (%rsp)         /* past rdmsr */
    iretq
IDT_DATA
