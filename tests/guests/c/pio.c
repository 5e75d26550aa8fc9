/* pio: the benchmark guest. Writes `count=N` (default 100000) times to the POST-code port
 * 0x80, one exit each, then exits through isa-debug-exit with code 0. */
#include "rt.h"

void guest_main(const u8 *zero_page) {
    u64 n = cmdline_u64(zero_page, "count", 100000);
    for (u64 i = 0; i < n; i++) outb(0x80, (u8)i);
    debug_exit(0);
}
