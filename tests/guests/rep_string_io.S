/* Sends its message with one REP OUTSB, reads 4 bytes of host input with one REP INSB into
   a buffer, echoes them with REP OUTSB, and powers off with the buffer's first byte. */
    .globl _start
    .text
_start:
    mov $0x3fa, %dx
    mov $0x07, %al
    out %al, %dx                /* FIFOs on (and cleared) before the host may send */
    lea msg(%rip), %rsi
    mov $msg_end - msg, %ecx
    mov $0x3f8, %dx
    rep outsb
    /* the host feeds its 4 bytes at once: when LSR says data is ready, all 4 are in the
       FIFO, and one REP INSB takes them */
    mov $0x3fd, %dx
1:  in %dx, %al
    test $1, %al
    jz 1b
    lea buf(%rip), %rdi
    mov $0x3f8, %dx
    mov $4, %ecx
    rep insb
    lea buf(%rip), %rsi
    mov $4, %ecx
    mov $0x3f8, %dx
    rep outsb
    movzbl buf(%rip), %eax
    out %eax, $0xf4
3:  hlt
    jmp 3b
    .section .rodata
msg: .ascii "rep outsb works\n"
msg_end:
    .bss
buf: .space 16
