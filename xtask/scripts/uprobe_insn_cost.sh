#!/bin/sh
# What one empty uprobe costs per hit, by the instruction it displaces: the
# kernel emulates some (push, one-byte nop, direct jumps and calls) and
# single-steps the rest, a second exception (docs/OVERHEAD.md, "Where a
# probe sits"). Builds a C program of naked functions, each opening with
# one instruction, and times 20,000 calls of each with a tracefs uprobe
# event on its first byte. Root; gcc. Mounts tracefs if needed.
#     sudo sh xtask/scripts/uprobe_insn_cost.sh
set -eu
T=/sys/kernel/tracing
[ -e $T/uprobe_events ] || mount -t tracefs nodev $T
dir=$(mktemp -d)
cat > "$dir/insn.c" <<'C'
#include <stdio.h>
#include <time.h>
#define F(name, body) __attribute__((naked, noinline)) void name(void) { __asm__ volatile(body "\n ret"); }
F(f_push, "push %rbx\n pop %rbx")
F(f_nop1, "nop\n nop")
F(f_nopl, "nopl 0x0(%rax,%rax,1)\n nop")
F(f_endbr, "endbr64\n nop")
F(f_jcc, "jz 1f\n 1: nop")
F(f_call, "call 1f\n 1: add $8,%rsp")
F(f_sub, "sub $0x28,%rsp\n add $0x28,%rsp")
F(f_mov, "mov %rdi,%rax\n nop")
static void (*fs[])(void) = {f_push, f_nop1, f_nopl, f_endbr, f_jcc, f_call, f_sub, f_mov};
static const char *names[] = {"push", "nop", "nopl", "endbr64", "jz", "call", "sub rsp", "mov"};
int main(void) {
    for (int k = 0; k < 8; k++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (int i = 0; i < 20000; i++) fs[k]();
        clock_gettime(CLOCK_MONOTONIC, &b);
        printf("%-8s %6.0f ns per call\n", names[k], ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / 20000.0);
    }
    return 0;
}
C
gcc -O2 -no-pie -o "$dir/insn" "$dir/insn.c"
funcs="f_push f_nop1 f_nopl f_endbr f_jcc f_call f_sub f_mov"
for f in $funcs; do
    addr=$(nm "$dir/insn" | awk -v f="$f" '$3 == f {print $1}')
    echo "p:lgcost/$f $dir/insn:$(printf '0x%x' $((0x$addr - 0x400000)))" >> $T/uprobe_events
done
echo 1 > $T/events/lgcost/enable
taskset -c 0 "$dir/insn" || true
echo 0 > $T/events/lgcost/enable
for f in $funcs; do echo "-:lgcost/$f" >> $T/uprobe_events; done
rm -rf "$dir"
