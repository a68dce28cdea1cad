/* RDMSR 0x40000000 and WRMSR 0x40000001 = 0x0000cafe0000f00d, RDMSR 0x40000001 (each read
   reported on port 0x11, edx:eax zeroed before it so a #GP reports 0), then RDMSR 0x40000002
   and RDMSR 0x40000003; powers off. Every #GP reaches the vector 13 handler, which reports the
   faulting RIP (the frame's, under the error code) on port 0x13 and skips the 2-byte
   instruction: the labels rd0, wr1, rd1, rd2, rd3 let a test name the expected RIPs. */
#include "guest.h"
.code64
.globl _start
_start:
    SET_GATE(13, gp_handler)
    lidt idtr(%rip)
    mov $0x40000000, %ecx
    xor %eax, %eax
    xor %edx, %edx
rd0: rdmsr
    shl $32, %rdx
    or %rdx, %rax
    REPORT64(%rax)
    mov $0x40000001, %ecx
    mov $0xf00d, %eax
    mov $0xcafe, %edx
wr1: wrmsr
    xor %eax, %eax
    xor %edx, %edx
rd1: rdmsr
    shl $32, %rdx
    or %rdx, %rax
    REPORT64(%rax)
    mov $0x40000002, %ecx
rd2: rdmsr
    mov $0x40000003, %ecx
rd3: rdmsr
    POWER_OFF
gp_handler:
    push %rax
    mov 16(%rsp), %rax      /* above the saved rax and the error code: the faulting RIP */
    outl %eax, $0x13
    pop %rax
    add $8, %rsp            /* the error code */
    addq $2, (%rsp)         /* past rdmsr/wrmsr */
    iretq
IDT_DATA
