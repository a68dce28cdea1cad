/* Jumps to a GPA with no RAM behind it (3.25 GiB, mapped by the identity map): KVM cannot
   fetch instructions from there and reports an emulation failure. */
    .globl _start
    .text
_start:
    mov $0x5eed, %rbx
    mov $0xd0000000, %rax
    jmp *%rax
