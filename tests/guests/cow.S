/* The book's copy-on-write page: GPA 0x1000000 and 0x1100000 share one read-only page.
   Write 0x2222 at 0x1000008 (intercepted: the handler gives this range a private copy), then
   write 0x3333 at 0x1000010 (lands in the copy, no intercept); report both ranges' values. */
#include "guest.h"
.code64
.globl _start
_start:
    mov $0x2222, %rax
    mov %rax, 0x1000008
    mov $0x3333, %rax
    mov %rax, 0x1000010
    mov 0x1000008, %rbx
    REPORT64(%rbx)
    mov 0x1100008, %rbx
    REPORT64(%rbx)
    mov 0x1000010, %rbx
    REPORT64(%rbx)
    POWER_OFF
