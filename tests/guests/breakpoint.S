/* Calls `target` rcx times; target adds 1 to rax. Then reports rax on port 0x12, powers off. */
.code64
.globl _start
_start:
    xor %eax, %eax
    mov $3, %ecx
1:  call target
    dec %ecx
    jnz 1b
    outl %eax, $0x12
    outb %al, $0xf4
2:  jmp 2b
.globl target
target:
    inc %rax
    ret
