/* Entered at CPL3 by the VMM: increments the qword at `counter` forever (native speed under
   PVM, so KVM_RUN never returns by itself). */
.code64
.globl _start
_start:
1:  incq counter(%rip)
    jmp 1b
.data
.balign 8
.globl counter
counter: .quad 0
