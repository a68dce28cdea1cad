/* Macros shared by the test guests (64-bit, CPL0 unless said otherwise). */

/* Point IDT gate `vector` at `handler` (interrupt gate, kernel CS 0x10); clobbers rax, rdi. */
#define SET_GATE(vector, handler)      \
    lea handler(%rip), %rax;           \
    lea idt + (vector) * 16(%rip), %rdi; \
    mov %ax, (%rdi);                   \
    movw $0x10, 2(%rdi);               \
    movw $0x8e00, 4(%rdi);             \
    shr $16, %rax;                     \
    mov %ax, 6(%rdi);                  \
    shr $16, %rax;                     \
    mov %eax, 8(%rdi);                 \
    movl $0, 12(%rdi)

/* The IDT itself and its descriptor: use once per guest, then `lidt idtr(%rip)`. */
#define IDT_DATA          \
    .data;                \
    .balign 16;           \
idtr: .word 256 * 16 - 1; \
    .quad idt;            \
    .balign 16;           \
idt: .space 256 * 16

/* Report a 64-bit register on port 0x11 as two 32-bit writes (low, high); clobbers rax. */
#define REPORT64(reg)       \
    mov reg, %rax;          \
    outl %eax, $0x11;       \
    shr $32, %rax;          \
    outl %eax, $0x11

/* Print the NUL-terminated string at `label` on COM1; clobbers rax, rdx, rsi. */
#define PUTS(label)            \
    lea label(%rip), %rsi;     \
97: lodsb;                     \
    test %al, %al;             \
    jz 98f;                    \
    mov $0x3f8, %dx;           \
    out %al, %dx;              \
    jmp 97b;                   \
98:

/* One access to port %dx of a width picked by bits 28-29 of the LCG state %r8d: an 8-, 16- or
   32-bit write of %r8d rotated left 13, or a read into `in_reg`; clobbers rax, rcx. */
#define RANDOM_PORT_ACCESS(in_reg) \
    mov %r8d, %eax;            \
    rol $13, %eax;             \
    mov %r8d, %ecx;            \
    shr $28, %ecx;             \
    and $3, %ecx;              \
    cmp $0, %ecx;              \
    je 93f;                    \
    cmp $1, %ecx;              \
    je 94f;                    \
    cmp $2, %ecx;              \
    je 95f;                    \
    in %dx, in_reg;            \
    jmp 96f;                   \
93: out %al, %dx;              \
    jmp 96f;                   \
94: out %ax, %dx;              \
    jmp 96f;                   \
95: out %eax, %dx;             \
96:

/* Write 32-bit `value` to VMBus controller register `reg` (port 0x0e00 + reg); clobbers rax, rdx. */
#define VMBUS_REG(reg, value)  \
    mov $0x0e00 + (reg), %dx;  \
    mov $(value), %eax;        \
    out %eax, %dx

/* Open the VMBus offer SELECTed before on the ring area at `ring` (below 4 GiB, zeroed by the
   caller): 8 pages split at 4, vector 0x40; the controller's STATUS ends in eax (0: open).
   Clobbers rax, rdx. */
#define VMBUS_OPEN(ring)            \
    VMBUS_REG(0x14, ring);          \
    VMBUS_REG(0x18, 0);             \
    VMBUS_REG(0x1c, 8);             \
    VMBUS_REG(0x20, 4);             \
    VMBUS_REG(0x24, 0x40);          \
    VMBUS_REG(0x28, 1);             \
    mov $0x0e00 + 0x2c, %dx;        \
    in %dx, %eax

#define POWER_OFF            \
    outb %al, $0xf4;         \
99: jmp 99b
