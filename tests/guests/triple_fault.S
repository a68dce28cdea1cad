/* With no IDT (limit 0), ud2 raises #UD that cannot be delivered: #GP, #DF, then a triple fault. */
.code64
.globl _start
_start:
    mov $0x7777, %rbx
    ud2
1:  jmp 1b
