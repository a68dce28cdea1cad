/* Prints "idle" and waits for interrupts forever: only its owner can end it. */
#include "guest.h"
    .globl _start
    .text
_start:
    PUTS(msg)
    sti
3:  hlt
    jmp 3b
    .section .rodata
msg: .asciz "idle\n"
