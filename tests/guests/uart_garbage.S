/* Writes pseudo-random values of every width to every COM1 register and reads them back,
   then resets the UART like a driver, prints "still talking" and powers off with status 0. */
#include "guest.h"
    .globl _start
    .text
_start:
    mov $0x12345678, %r8d       /* LCG state */
    mov $3000, %r9d             /* iterations */
1:  imul $1103515245, %r8d, %r8d
    add $12345, %r8d
    mov %r8d, %eax
    shr $8, %eax
    and $7, %eax
    lea 0x3f8(%rax), %edx        /* port 0x3f8..0x3ff */
    RANDOM_PORT_ACCESS(%al)
    dec %r9d
    jnz 1b
    /* driver reset: LCR 8N1 (DLAB off), IER 0, FCR FIFOs on, MCR DTR|RTS|OUT2 */
    mov $0x3fb, %dx
    mov $0x03, %al
    out %al, %dx
    mov $0x3f9, %dx
    xor %al, %al
    out %al, %dx
    mov $0x3fa, %dx
    mov $0x07, %al
    out %al, %dx
    mov $0x3fc, %dx
    mov $0x0b, %al
    out %al, %dx
    PUTS(msg)
    xor %eax, %eax
    out %al, $0xf4
4:  hlt
    jmp 4b
    .section .rodata
msg: .asciz "\nstill talking\n"
