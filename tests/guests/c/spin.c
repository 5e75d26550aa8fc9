/* spin: computes for a while so that it can be paused and resumed mid-run. It prints a
 * progress line every `step=N` iterations (default 20000) of `iters=N` (default 200000),
 * then checks its result against a closed form: exit 0 if right, 1 if wrong. With
 * `pattern=1` it first writes 4 KiB of a known pattern (byte i is i * 13 + 7) at physical
 * 0x300000 and prints `spin guest: pattern at 0x300000` (the scripting tests dump it). */
#include "rt.h"

void guest_main(const u8 *zero_page) {
    u64 iters = cmdline_u64(zero_page, "iters", 200000);
    u64 step = cmdline_u64(zero_page, "step", 20000);
    u64 sum = 0;
    if (cmdline_u64(zero_page, "pattern", 0)) {
        volatile u8 *pattern = (volatile u8 *)0x300000;
        for (u64 i = 0; i < 4096; i++) pattern[i] = (u8)(i * 13 + 7);
        puts("spin guest: pattern at 0x300000\n");
    }
    puts("spin guest: start\n");
    for (u64 i = 1; i <= iters; i++) {
        sum += i;
        if (i % step == 0) {
            puts("spin guest: ");
            putu(i);
            puts("\n");
        }
    }
    u64 expect = iters * (iters + 1) / 2;
    puts("spin guest: sum=");
    putu(sum);
    puts(sum == expect ? " ok\n" : " WRONG\n");
    debug_exit(sum == expect ? 0 : 1);
}
