/* Prints "hello from the test guest" on COM1, then powers off with status 7. */
#include "guest.h"
    .globl _start
    .text
_start:
    PUTS(msg)
    mov $7, %eax
    out %eax, $0xf4
3:  hlt
    jmp 3b
    .section .rodata
msg: .asciz "hello from the test guest\n"
