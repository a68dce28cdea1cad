/* A hostile storage guest: opens the synthetic storage channel (offer 1, after Dynamic Memory's)
   on a clean ring and sends, in one batch, a request of an unknown operation, a READ beyond the
   disk's end (a 1 MiB disk: 2048 sectors), a READ into a page outside guest RAM, a WRITE larger
   than a request may be, a READ whose PFN list does not cover its sectors, then a good WRITE of
   page 0x500000 to LBA 8 and a good READ of LBA 8 into page 0x501000. It checks each response:
   the request id echoed and statuses 2 3 4 5 1 0 0, and that the page read back is the page
   written. Prints "still standing" and powers off with status 42 (else the step that failed:
   1 open, 2 not consumed, 3 no responses, 10+i response i wrong, 20 read-back differs). */
#include "guest.h"
    .globl _start
    .set BASE, 0x0e00
    .set RING, 0x400000
    .set OUT_DATA, RING + 0x1000
    .set IN_CTL, RING + 0x4000
    .set IN_DATA, RING + 0x5000
    .set PAGE_W, 0x500000
    .set PAGE_R, 0x501000
    .set NREQ, 7
    .set RESP, 48               /* descriptor 16 + response 24 + trailer 8 */
    .text
_start:
    cli
    mov $RING, %edi             /* both rings' control and data pages: indices 0 */
    xor %eax, %eax
    mov $8 * 512, %ecx
    rep stosq
    mov $PAGE_W, %edi           /* the page to write: a pattern; the page to read into: zero */
    movabs $0x5a5a5a5a12345678, %rax
    mov $512, %ecx
    rep stosq
    xor %eax, %eax
    mov $512, %ecx
    rep stosq

    VMBUS_REG(0x0c, 1)          /* SELECT offer 1 (storage), open it on the ring */
    VMBUS_OPEN(RING)
    test %eax, %eax
    mov $1, %ebx
    jnz fail

    lea packets(%rip), %rsi     /* the seven packets, trailers included, then publish */
    mov $OUT_DATA, %edi
    mov $(packets_end - packets) / 8, %ecx
    rep movsq
    lock orl $0, (%rsp)
    movl $packets_end - packets, RING
    lock orl $0, (%rsp)
    mov $BASE + 0x30, %dx
    mov $2, %eax                /* doorbell of channel 2 */
    out %eax, %dx

    mov $2000000, %ecx
2:  cmpl $packets_end - packets, RING + 4
    je 3f
    pause
    loop 2b
    mov $2, %ebx
    jmp fail
3:  mov $2000000, %ecx
4:  cmpl $NREQ * RESP, IN_CTL
    je 5f
    pause
    loop 4b
    mov $3, %ebx
    jmp fail

5:  xor %r9d, %r9d              /* response i: trans_id i + 1, status expected[i] */
    lea expected(%rip), %r10
6:  imul $RESP, %r9d, %eax
    lea 10(%r9), %ebx
    lea 1(%r9), %ecx
    cmp %rcx, IN_DATA + 8(%rax)
    jne fail
    mov (%r10,%r9,4), %ecx
    cmp %ecx, IN_DATA + 20(%rax)
    jne fail
    inc %r9d
    cmp $NREQ, %r9d
    jne 6b

    mov $PAGE_W, %esi
    mov $PAGE_R, %edi
    mov $512, %ecx
    repe cmpsq
    mov $20, %ebx
    jne fail
    PUTS(msg)
    mov $42, %ebx
fail:
    mov %ebx, %eax
    out %eax, $0xf4
9:  hlt
    jmp 9b

    .section .rodata
    .balign 8
#define DESC(len8) .quad 0x0000000000020006 | ((len8) << 32)
packets:
    DESC(5); .quad 1; .quad 0x77; .quad 0; .quad 0; .quad 0 << 32                  /* unknown op */
    DESC(6); .quad 2; .quad 0x0000000800000002; .quad 2045; .quad 1 << 32; .quad 0x500; .quad 48 << 32
    DESC(6); .quad 3; .quad 0x0000000800000002; .quad 0; .quad 1 << 32; .quad 0x10000000; .quad 104 << 32
    DESC(5); .quad 4; .quad 0x0000010000000003; .quad 0; .quad 33 << 32; .quad 160 << 32  /* 128 KiB */
    DESC(5); .quad 5; .quad 0x0000000800000002; .quad 0; .quad 0; .quad 208 << 32  /* no PFNs */
    DESC(6); .quad 6; .quad 0x0000000800000003; .quad 8; .quad 1 << 32; .quad 0x500; .quad 256 << 32
    DESC(6); .quad 7; .quad 0x0000000800000002; .quad 8; .quad 1 << 32; .quad 0x501; .quad 312 << 32
packets_end:
    .balign 4
expected: .long 2, 3, 4, 5, 1, 0, 0
msg: .asciz "still standing\n"
