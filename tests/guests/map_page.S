/* Maps GVA 0x80_0060_5000 (PML4[1], PDPT[0], PD[3], PT[5]: 4 KiB pages, tables at GPA 8 MiB,
   beside the VMM's identity map of PML4[0]) to GPA 0x9a5000, reloads CR3, writes 0x7ab1e5 at
   GVA 0x80_0060_5123 through the new mapping, then powers off. Guest RAM starts zeroed, so the
   new tables have no other entries. */
#include "guest.h"
.code64
.globl _start
_start:
    mov %cr3, %rax
    and $~0xfff, %rax
    movq $0x800003, 8(%rax)          /* PML4[1] -> PDPT at 0x800000, present|write */
    movq $0x801003, 0x800000         /* PDPT[0] -> PD at 0x801000 */
    movq $0x802003, 0x801000 + 8 * 3 /* PD[3] -> PT at 0x802000 */
    movq $0x9a5003, 0x802000 + 8 * 5 /* PT[5] -> the page at GPA 0x9a5000 */
    mov %cr3, %rax
    mov %rax, %cr3                   /* flush the TLB */
    movabs $0x8000605123, %rdi
    movl $0x7ab1e5, (%rdi)
    POWER_OFF
