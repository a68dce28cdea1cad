/* multiboot_kernel.S -- a Multiboot v1 kernel: the header in its first 8 KiB, entered in 32-bit
 * protected mode with EAX = 0x2BADB002 and EBX = the multiboot_info. Built as a 32-bit ELF, or
 * with AOUT_KLUDGE as a flat image whose header carries the load addresses (flag bit 16). */
#include "boot32.h"
#define MB_MAGIC 0x1BADB002
#ifdef AOUT_KLUDGE
#define MB_FLAGS 0x00010003     /* page-align modules, memory info, address fields */
#else
#define MB_FLAGS 0x00000003
#endif

    .section .multiboot, "a"
    .balign 4
mb_header:
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
#ifdef AOUT_KLUDGE
    .long mb_header             /* header_addr */
    .long _load_start           /* load_addr */
    .long _edata                /* load_end_addr */
    .long _end                  /* bss_end_addr */
    .long _start                /* entry_addr */
#endif

    .text
    .code32
    .globl _start
_start:
    mov $stack_top, %esp        /* the protocol gives no stack */
    push %ebx                   /* struct multiboot_info * */
    push %eax                   /* the boot loader's magic */
    call_main multiboot_main

    boot_stack
