/* At CPL3: count in rbx, store it at `counter`, copy xmm0's low qword to `xmm_seen`, forever. */
.code64
.globl _start
_start:
1:  inc %rbx
    mov %rbx, counter(%rip)
    movq %xmm0, %rax
    mov %rax, xmm_seen(%rip)
    jmp 1b
.data
.balign 8
.globl counter
counter: .quad 0
.globl xmm_seen
xmm_seen: .quad 0
