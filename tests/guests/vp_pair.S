/* VP 0 (_start) writes to port 0x31 once; VP 1 (second) counts on port 0x30 forever. */
.code64
.globl _start
_start:
    mov $1, %eax
    outl %eax, $0x31
1:  jmp 1b
.globl second
second:
    xor %eax, %eax
2:  inc %eax
    outl %eax, $0x30
    jmp 2b
