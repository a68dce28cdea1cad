"""A virtual processor's register state as plain dataclasses (the book's "VP registers")."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from pyhv.kvm import structs as ks

GPR_NAMES = tuple(f[0] for f in ks.kvm_regs._fields_)


@dataclass(slots=True)
class Registers:
    """General-purpose registers, RIP and RFLAGS (KVM_GET_REGS)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2

    @classmethod
    def from_kvm(cls, r: ks.kvm_regs) -> Registers:
        return cls(*(getattr(r, n) for n in GPR_NAMES))

    def to_kvm(self) -> ks.kvm_regs:
        return ks.kvm_regs(*(getattr(self, n) & 0xFFFFFFFFFFFFFFFF for n in GPR_NAMES))


_SEG_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl")


@dataclass(slots=True)
class Segment:
    """A segment register with its hidden descriptor part."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 3
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - the descriptor's L bit
    g: int = 0
    avl: int = 0
    unusable: int = 0

    @classmethod
    def from_kvm(cls, k: ks.kvm_segment) -> Segment:
        return cls(
            k.base,
            k.limit,
            k.selector,
            k.type,
            k.present,
            k.dpl,
            k.db,
            k.s,
            k.l,
            k.g,
            k.avl,
            k.unusable,
        )

    def to_kvm(self) -> ks.kvm_segment:
        k = ks.kvm_segment()
        for n in _SEG_FIELDS:
            setattr(k, n, getattr(self, n))
        k.unusable = self.unusable
        return k

    @property
    def attributes(self) -> int:
        """The 16-bit attribute word as Hyper-V's HV_X64_SEGMENT_REGISTER carries it."""
        return (
            (self.type & 0xF)
            | (self.s & 1) << 4
            | (self.dpl & 3) << 5
            | (self.present & 1) << 7
            | (self.avl & 1) << 12
            | (self.l & 1) << 13
            | (self.db & 1) << 14
            | (self.g & 1) << 15
        )


@dataclass(slots=True)
class DescriptorTable:
    base: int = 0
    limit: int = 0xFFFF


def _seg() -> Segment:
    return Segment()


@dataclass(slots=True)
class SpecialRegisters:
    """Segments, descriptor tables, control registers, EFER and APIC base (KVM_GET_SREGS)."""

    cs: Segment = field(default_factory=_seg)
    ds: Segment = field(default_factory=_seg)
    es: Segment = field(default_factory=_seg)
    fs: Segment = field(default_factory=_seg)
    gs: Segment = field(default_factory=_seg)
    ss: Segment = field(default_factory=_seg)
    tr: Segment = field(default_factory=_seg)
    ldt: Segment = field(default_factory=_seg)
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0
    interrupt_bitmap: tuple[int, int, int, int] = (0, 0, 0, 0)

    @classmethod
    def from_kvm(cls, k: ks.kvm_sregs) -> SpecialRegisters:
        out = cls(
            gdt=DescriptorTable(k.gdt.base, k.gdt.limit),
            idt=DescriptorTable(k.idt.base, k.idt.limit),
            interrupt_bitmap=tuple(k.interrupt_bitmap),  # type: ignore[arg-type]
        )
        for n in ks.SEGMENT_NAMES:
            setattr(out, n, Segment.from_kvm(getattr(k, n)))
        for n in ks.CONTROL_NAMES:
            setattr(out, n, getattr(k, n))
        return out

    def to_kvm(self) -> ks.kvm_sregs:
        k = ks.kvm_sregs()
        for n in ks.SEGMENT_NAMES:
            setattr(k, n, getattr(self, n).to_kvm())
        k.gdt.base, k.gdt.limit = self.gdt.base, self.gdt.limit
        k.idt.base, k.idt.limit = self.idt.base, self.idt.limit
        for n in ks.CONTROL_NAMES:
            setattr(k, n, getattr(self, n))
        for i, v in enumerate(self.interrupt_bitmap):
            k.interrupt_bitmap[i] = v
        return k


def changed_fields(before: Registers, after: Registers) -> dict[str, int]:
    """The registers a handler changed, so only those are written back."""
    return {
        f.name: getattr(after, f.name)
        for f in fields(Registers)
        if getattr(after, f.name) != getattr(before, f.name)
    }
