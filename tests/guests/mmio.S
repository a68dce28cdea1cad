/* Reads 1, 2, 4 and 8 bytes at GPA 0xd0000000 and writes each value back, same size, to
   0xd0000100; reads 8 bytes at 0xe0000000 (nobody intercepts it) and writes that too. */
#include "guest.h"
.code64
.globl _start
_start:
    mov $0xd0000000, %rbx
    mov $0xd0000100, %rcx
    movb (%rbx), %al
    movb %al, (%rcx)
    movw (%rbx), %ax
    movw %ax, (%rcx)
    movl (%rbx), %eax
    movl %eax, (%rcx)
    movq (%rbx), %rax
    movq %rax, (%rcx)
    mov $0xe0000000, %rdx
    movq (%rdx), %rax
    movq %rax, (%rcx)
    POWER_OFF
