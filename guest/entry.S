/* entry.S -- the two ways in (64-bit direct boot per docs/boot-protocol.md, 32-bit Xen PVH),
 * the GDT/TSS, the interrupt stubs, and the switch between the kernel and a CPL3 task. */
#define KCODE32 0x08
#define KCODE 0x10
#define KDATA 0x18
#define TSS_SEL 0x40 /* CPU n's TSS is at TSS_SEL + 16 * n */
#define MAX_CPUS 64
#define TRAMPOLINE 0x8000 /* where CPU 0 copies ap_trampoline: the page of SIPI vector 0x08 */

/* ---------------------------------------------------------------- Xen PVH ELF note */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                     /* namesz: "Xen\0" */
    .long 4                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start32

/* ---------------------------------------------------------------- 64-bit entry (RSI = boot info) */
    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    mov %rsi, %r12
    lgdt gdtr(%rip)
    mov $KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    pushq $KCODE
    lea 1f(%rip), %rax
    pushq %rax
    lretq
1:  lea kstack_top(%rip), %rsp
    /* zero .bss (kept small: big arrays live in .bss.noinit and are set up on use) */
    lea _bss_start(%rip), %rdi
    lea _bss_end(%rip), %rcx
    sub %rdi, %rcx
    shr $3, %rcx
    xor %eax, %eax
    cld
    rep stosq
    mov %r12, %rdi
    call kmain
    jmp halt_forever

/* An application processor, from ap_trampoline, in long mode on the image's GDT and CPU 0's page
 * tables: its index is its LAPIC ID; ap_main on a kernel stack of its own. */
ap_start64:
    mov $KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $0xFEE00020, %edx       /* LAPIC ID register */
    mov (%rdx), %edi
    shr $24, %edi
    cmp $MAX_CPUS, %edi
    jae halt_forever            /* CPU 0 starts only the CPUs it has slots for */
    lea ap_stack_top(%rip), %rax
    mov (%rax,%rdi,8), %rsp     /* its kernel stack, from CPU 0 (kernel.c) */
    call ap_main
    jmp halt_forever

/* The real-mode start of an application processor (INIT, then STARTUP IPI with vector 0x08: CS =
 * 0x0800, IP = 0). CPU 0 copies it to TRAMPOLINE and patches tr_cr3 with its CR3. Straight to long
 * mode: PAE, CR3, EFER.LME, then PE and PG together, then a far jump to the 64-bit code segment. */
    .section .rodata
    .code16
    .globl ap_trampoline, ap_trampoline_end, ap_trampoline_cr3
ap_trampoline:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (tr_gdtr - ap_trampoline)
    mov $0x620, %eax            /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov (ap_trampoline_cr3 - ap_trampoline), %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx       /* EFER |= LME | SCE */
    rdmsr
    or $0x101, %eax
    wrmsr
    mov $0x80010033, %eax       /* PG | WP | NE | ET | MP | PE */
    mov %eax, %cr0
    ljmpl $KCODE, $(TRAMPOLINE + tr_long - ap_trampoline)
    .code64
tr_long:
    mov $ap_start64, %eax       /* the image is below 4 GiB */
    jmp *%rax
    .balign 8
tr_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_trampoline_cr3:
    .long 0
ap_trampoline_end:

/* ---------------------------------------------------------------- 32-bit PVH entry (EBX = hvm_start_info) */
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %esi
    lgdt gdtr
    ljmp $KCODE32, $1f
1:  mov $KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    /* PML4[0] -> PDPT; PDPT[0..63] -> 64 page directories; PD entries map 0..64 GiB with 2 MiB pages */
    mov $pvh_pml4, %edi
    mov $1024, %ecx
    xor %eax, %eax
    rep stosl
    movl $pvh_pdpt + 3, pvh_pml4
    mov $pvh_pdpt, %edi
    mov $pvh_pd + 3, %eax
    xor %ecx, %ecx
2:  mov %eax, (%edi,%ecx,8)
    movl $0, 4(%edi,%ecx,8)
    add $4096, %eax
    inc %ecx
    cmp $64, %ecx
    jb 2b
3:  movl $0, (%edi,%ecx,8)
    movl $0, 4(%edi,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jb 3b
    mov $pvh_pd, %edi
    xor %ecx, %ecx
4:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, (%edi,%ecx,8)
    mov %ecx, %eax
    shr $11, %eax
    mov %eax, 4(%edi,%ecx,8)
    inc %ecx
    cmp $32768, %ecx
    jb 4b
    mov $0x620, %eax            /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $pvh_pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx       /* EFER |= LME | SCE */
    rdmsr
    or $0x101, %eax
    wrmsr
    mov $0x80010033, %eax       /* PG | WP | NE | ET | MP | PE */
    mov %eax, %cr0
    ljmp $KCODE, $pvh_start64

    .code64
pvh_start64:
    mov $KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    lea kstack_top(%rip), %rsp
    mov %esi, %edi              /* hvm_start_info, zero-extended */
    lea pvh_bootinfo(%rip), %rsi
    call pvh_convert            /* fills pvh_bootinfo from hvm_start_info */
    lea pvh_bootinfo(%rip), %rsi
    jmp _start

/* ---------------------------------------------------------------- interrupt and exception stubs */
    .text
.macro STUB v
    .balign 16
stub_\v:
    .if (\v == 8) || (\v >= 10 && \v <= 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    .else
    pushq $0
    .endif
    pushq $\v
    jmp trap_common
.endm
.altmacro
.set i, 0
.rept 256
    STUB %i
    .set i, i+1
.endr

trap_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    cld
    call trap
trap_return:
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

/* u64 run_user(struct frame *f, u64 *kctx_rsp): enter a CPL3 task at f, keeping the kernel's stack
 * pointer in this CPU's *kctx_rsp; returns v when a trap calls back_to_kernel(v, kctx_rsp) */
    .globl run_user
run_user:
    push %rbx
    push %rbp
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, (%rsi)
    mov %rdi, %rsp
    jmp trap_return

    .globl back_to_kernel
back_to_kernel:
    mov (%rsi), %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbp
    pop %rbx
    mov %rdi, %rax
    ret

    .globl halt_forever
halt_forever:
    cli
1:  hlt
    jmp 1b

    .globl poweroff
poweroff:
    mov %edi, %eax
    mov $0xF4, %dx
    outl %eax, %dx
    jmp halt_forever

/* The system call of CPL3 tasks: `int n` and SYSCALL do not reach CPL0 on this KVM, exceptions do.
 * RDI = operation, RSI = argument; the #UD handler recognises this address and skips the ud2. */
    .globl user_sys
user_sys:
    ud2
    ret

    .section .rodata
    .globl stub_table
    .balign 8
stub_table:
.macro STUBADDR v
    .quad stub_\v
.endm
.set i, 0
.rept 256
    STUBADDR %i
    .set i, i+1
.endr

/* ---------------------------------------------------------------- GDT (selectors as in the boot protocol) */
    .data
    .balign 16
    .globl gdt
gdt:
    .quad 0                     /* 0x00 */
    .quad 0x00cf9a000000ffff    /* 0x08 kernel code, 32-bit (PVH entry only) */
    .quad 0x00af9a000000ffff    /* 0x10 kernel code, 64-bit */
    .quad 0x00cf92000000ffff    /* 0x18 kernel data */
    .quad 0                     /* 0x20 unused */
    .quad 0x00cff2000000ffff    /* 0x28 user data (0x2b) */
    .quad 0x00affa000000ffff    /* 0x30 user code, 64-bit (0x33) */
    .quad 0                     /* 0x38 */
    .globl tss_desc
tss_desc:
    .skip 16 * MAX_CPUS         /* 0x40 + 16 * n: CPU n's TSS, filled in by trap_cpu_init */
gdt_end:
    .balign 8
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt

/* ---------------------------------------------------------------- stacks and PVH-only tables: never zeroed */
    .section .bss.noinit, "aw", @nobits
    .balign 4096
pvh_pml4:   .skip 4096
pvh_pdpt:   .skip 4096
pvh_pd:     .skip 64 * 4096
kstack:     .skip 16384
kstack_top:
    .globl rsp0_stack_top
rsp0_stack: .skip 16384
rsp0_stack_top:
    .balign 64
    .globl pvh_bootinfo
pvh_bootinfo: .skip 4096
