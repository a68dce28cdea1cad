/* Prints "idle" and waits for interrupts forever: only its owner can end it. */
    .globl _start
    .text
_start:
    lea msg(%rip), %rsi
1:  lodsb
    test %al, %al
    jz 2f
    mov $0x3f8, %dx
    out %al, %dx
    jmp 1b
2:  sti
3:  hlt
    jmp 3b
    .section .rodata
msg: .asciz "idle\n"
