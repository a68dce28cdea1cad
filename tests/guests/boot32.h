/* boot32.h -- what the 32-bit test kernels (pvh_kernel.S, multiboot_kernel.S) share: neither boot
 * protocol gives a stack, so each kernel brings one, and a C entry that returns halts the CPU. */

/* Call the kernel's C entry (its arguments already pushed); halt for good if it returns. */
.macro call_main main
    call \main
1:  hlt
    jmp 1b
.endm

/* The kernel's own stack: 4 KiB in .bss, stack_top its top. */
.macro boot_stack
    .bss
    .balign 16
    .space 4096
stack_top:
.endm
