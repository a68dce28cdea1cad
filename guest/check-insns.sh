#!/bin/sh
# check-insns.sh ELF -- fail if the image contains an instruction this machine's CPL0 emulator cannot run
# (SSE/AVX/x87, popcnt, lzcnt/tzcnt, crc32, cmpxchg16b, rdtscp, rdpid, movbe, xgetbv/xsave, int3, int n,
# vmcall/vmmcall). See /work/shared/reference/kvm-here.md. Prints the offending lines.
set -eu
elf=$1
objdump -d --no-show-raw-insn -M att "$elf" >"$elf.dis"
bad=$(awk -F'\t' '
    NF >= 2 && $1 ~ /^ *[0-9a-f]+:$/ {
        split($2, w, " ")
        m = w[1]
        if (m ~ /^(rep|repz|repnz|lock|data16|addr32|cs|ds|es|ss|fs|gs|notrack|bnd)$/ && w[2] != "") m = w[2]
        if (m ~ /^f/ && m !~ /^fs$/) { print; next }
        if (m ~ /^(popcnt|lzcnt|tzcnt|crc32|cmpxchg16b|rdtscp|rdpid|movbe|xgetbv|xsetbv|int3|int|into|vmcall|vmmcall|emms|ldmxcsr|stmxcsr)/) { print; next }
        if (m ~ /^(xsave|xrstor|fxsave|fxrstor)/) { print; next }
        if ($2 ~ /%(x|y|z)mm[0-9]|%mm[0-7]|%st[(]?/) { print; next }
    }' "$elf.dis")
rm -f "$elf.dis"
if [ -n "$bad" ]; then
    echo "$elf: instructions the CPL0 emulator of this KVM rejects:" >&2
    echo "$bad" >&2
    exit 1
fi
