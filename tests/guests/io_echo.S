/* Reads a byte, a word and a dword from port 0x10 and writes each back to port 0x11;
   rbx (set by the VMM or a handler) goes to port 0x12; then powers off on port 0xf4. */
.code64
.globl _start
_start:
    mov $0x10, %dx
    inb %dx, %al
    outb %al, $0x11
    inw %dx, %ax
    outw %ax, $0x11
    inl %dx, %eax
    outl %eax, $0x11
    mov %ebx, %eax
    outl %eax, $0x12
    outb %al, $0xf4
1:  jmp 1b
