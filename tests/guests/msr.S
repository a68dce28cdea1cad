/* RDMSR 0x40000000 (reported on port 0x11), WRMSR 0x40000001 = 0x0000cafe0000f00d,
   RDMSR 0x40000002 and RDMSR 0x40000003 (each should raise #GP: the #GP handler reports 0xee
   on port 0x13 and skips the 2-byte instruction), then powers off. */
#include "guest.h"
.code64
.globl _start
_start:
    SET_GATE(13, gp_handler)
    lidt idtr(%rip)
    mov $0x40000000, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    REPORT64(%rax)
    mov $0x40000001, %ecx
    mov $0xf00d, %eax
    mov $0xcafe, %edx
    wrmsr
    mov $0x40000002, %ecx
    rdmsr
    mov $0x40000003, %ecx
    rdmsr
    POWER_OFF
gp_handler:
    push %rax
    mov $0xee, %al
    outb %al, $0x13
    pop %rax
    add $8, %rsp            /* the error code */
    addq $2, (%rsp)         /* past rdmsr/wrmsr */
    iretq
IDT_DATA
