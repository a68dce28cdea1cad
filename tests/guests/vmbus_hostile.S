/* A hostile VMBus guest: pseudo-random values of every width to every VMBus controller register,
   then a channel opened on a clean ring into which it writes a Dynamic Memory message that lies
   about its size, then a packet whose descriptor points outside itself, then a doorbell for a
   channel that does not exist. Prints "still standing" and powers off with status 42
   (1, 2, 3: a step it expected did not happen). */
#include "guest.h"
    .globl _start
    .set BASE, 0x0e00
    .set RING, 0x200000
    .set DATA, RING + 0x1000
    .text
_start:
    mov $0x9e3779b9, %r8d       /* LCG state */
    mov $1500, %r9d             /* iterations */
1:  imul $1103515245, %r8d, %r8d
    add $12345, %r8d
    mov %r8d, %eax
    shr $8, %eax
    xor %edx, %edx
    mov $0x34, %ecx
    div %ecx                    /* edx = register offset 0..0x33 */
    add $BASE, %edx
    RANDOM_PORT_ACCESS(%eax)
    dec %r9d
    jnz 1b

    /* offer 0: close it in case the garbage opened it, then open it on a clean ring */
    mov $BASE + 0x0c, %dx
    xor %eax, %eax
    out %eax, %dx
    mov $BASE + 0x28, %dx
    mov $2, %eax
    out %eax, %dx
    mov $RING, %edi
    xor %eax, %eax
    mov $8 * 512, %ecx
    rep stosq
    VMBUS_OPEN(RING)
    test %eax, %eax
    mov $1, %ebx
    jnz fail

    /* packet 1: inband data, 16-byte payload: a DM_BALLOON_RESPONSE header claiming 4000 bytes */
    mov $DATA, %edi
    movabs $0x0000000400020006, %rax   /* type 6, offset8 2, len8 4, flags 0 */
    mov %rax, (%rdi)
    movq $0, 8(%rdi)
    movq $0x0fa00007, 16(%rdi)         /* dm_header type 7, size 4000, trans_id 0 */
    movq $0, 24(%rdi)
    movq $0, 32(%rdi)                  /* trailer: start 0 << 32 */
    lock orl $0, (%rsp)
    movl $40, RING                     /* write_index */
    lock orl $0, (%rsp)
    mov $BASE + 0x30, %dx
    mov $1, %eax
    out %eax, %dx                      /* doorbell of channel 1 (the ioeventfd) */
    mov $2000000, %ecx
2:  cmpl $40, RING + 4                 /* wait for the host to consume it */
    je 3f
    pause
    loop 2b
    mov $2, %ebx
    jmp fail

    /* packet 2: descriptor with offset8 beyond len8: the ring's framing is lost */
3:  movabs $0x0000000201ff0006, %rax
    mov %rax, DATA + 40
    movq $0, DATA + 48
    movq $0, DATA + 56
    lock orl $0, (%rsp)
    movl $64, RING
    lock orl $0, (%rsp)
    mov $BASE + 0x30, %dx
    mov $1, %eax
    out %eax, %dx
    mov $200000, %r9d                  /* wait until offer 0 no longer says open */
4:  mov $BASE + 0x0c, %dx
    xor %eax, %eax
    out %eax, %dx
    mov $BASE + 0x10, %dx
    mov $10, %ecx
5:  in %dx, %eax
    loop 5b
    test $1, %eax
    jz 6f
    dec %r9d
    jnz 4b
    mov $3, %ebx
    jmp fail

    /* a doorbell for channel 99 */
6:  mov $BASE + 0x30, %dx
    mov $99, %eax
    out %eax, %dx
    PUTS(msg)
    mov $42, %ebx
fail:
    mov %ebx, %eax
    out %eax, $0xf4
9:  hlt
    jmp 9b
    .section .rodata
msg: .asciz "still standing\n"
