/* String I/O: one OUTSB and a REP OUTSB of "Hello" to port 0x120, REP INSB of 8 bytes from port
   0x121 into `buf`, then REP OUTSB of `buf` to port 0x122 (0x20-0x21 belong to the in-kernel PIC). */
#include "guest.h"
.code64
.globl _start
_start:
    cld
    lea msg(%rip), %rsi
    mov $0x120, %dx
    outsb
    mov $4, %ecx
    rep outsb
    lea buf(%rip), %rdi
    mov $0x121, %dx
    mov $8, %ecx
    rep insb
    lea buf(%rip), %rsi
    mov $0x122, %dx
    mov $8, %ecx
    rep outsb
    POWER_OFF
.data
msg: .ascii "Hello"
.globl buf
buf: .space 8
