/* Writes one qword at each of the rcx addresses in the table at rbx, then powers off. */
#include "guest.h"
.code64
.globl _start
_start:
1:  mov (%rbx), %rdi
    movq $1, (%rdi)
    add $8, %rbx
    dec %rcx
    jnz 1b
    POWER_OFF
