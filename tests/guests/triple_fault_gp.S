/* Loads a marker into RBX, then reads a non-canonical address: #GP with no IDT -> #DF ->
   triple fault. The worker must report it with the registers. */
    .globl _start
    .text
_start:
    mov $0x7e57fa17, %rbx
    mov $0x8000000000000000, %rax
    mov (%rax), %rcx
    hlt
