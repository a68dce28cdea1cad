/* pvh_kernel.S -- a 32-bit ELF kernel entered by the Xen PVH protocol only: its
 * XEN_ELFNOTE_PHYS32_ENTRY note names the entry, reached in protected mode with paging off and
 * EBX = the hvm_start_info. Its ELF entry is the same address (the PVH entry is what counts). */
#include "boot32.h"
    .section .note.Xen, "a"
    .balign 4
    .long 4, 4, 18              /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start

    .text
    .code32
    .globl _start, pvh_start
_start:
pvh_start:
    mov $stack_top, %esp        /* the protocol gives no stack */
    push %ebx                   /* struct hvm_start_info * */
    call_main pvh_main

    boot_stack
