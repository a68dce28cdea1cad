/* Prints "hello from the test guest" on COM1, then powers off with status 7. */
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
2:  mov $7, %eax
    out %eax, $0xf4
3:  hlt
    jmp 3b
    .section .rodata
msg: .asciz "hello from the test guest\n"
