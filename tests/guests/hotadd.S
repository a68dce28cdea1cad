/* Polls GPA 0x4000000 (not RAM at first) until it reads 0x5a5a5a5a, then reports it. */
#include "guest.h"
.code64
.globl _start
_start:
1:  mov 0x4000000, %rax
    cmp $0x5a5a5a5a, %rax
    jne 1b
    REPORT64(%rax)
    POWER_OFF
