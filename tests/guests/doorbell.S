/* Writes rcx values 0, 1, 2, ... to port 0x50 (an ioeventfd doorbell), then powers off. */
#include "guest.h"
.code64
.globl _start
_start:
    xor %eax, %eax
1:  outl %eax, $0x50
    inc %eax
    cmp %ecx, %eax
    jne 1b
    POWER_OFF
