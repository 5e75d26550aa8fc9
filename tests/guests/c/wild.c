/* wild: pokes ports and addresses nothing answers, checks every read came back all-ones,
 * then reports and exits with 0 if so, 1 if not. `count=N` pokes each N times. */
#include "rt.h"

void guest_main(const u8 *zero_page) {
    u64 n = cmdline_u64(zero_page, "count", 4);
    u64 bad = 0, reads = 0, writes = 0;
    static const u16 ports[] = {0x1234, 0x2f8, 0xdead, 0xfff0};
    static const u64 addrs[] = {0xd0000000UL, 0xfe000000UL, 0xc1234560UL};
    puts("wild guest: poking\n");
    for (u64 i = 0; i < n; i++) {
        for (unsigned p = 0; p < sizeof(ports) / sizeof(ports[0]); p++) {
            outb(ports[p], 0x55);
            outw(ports[p], 0x5555);
            outl(ports[p], 0x55555555);
            writes += 3;
            bad += inb(ports[p]) != 0xff;
            bad += inw(ports[p]) != 0xffff;
            bad += inl(ports[p]) != 0xffffffffu;
            reads += 3;
        }
        for (unsigned a = 0; a < sizeof(addrs) / sizeof(addrs[0]); a++) {
            mmio_write32(addrs[a], 0x55555555);
            mmio_write8(addrs[a] + 1, 0x55);
            writes += 2;
            bad += mmio_read8(addrs[a]) != 0xff;
            bad += mmio_read32(addrs[a]) != 0xffffffffu;
            bad += mmio_read64(addrs[a]) != 0xffffffffffffffffUL;
            reads += 3;
        }
    }
    puts("wild guest: reads=");
    putu(reads);
    puts(" writes=");
    putu(writes);
    puts(" not-all-ones=");
    putu(bad);
    puts("\n");
    debug_exit(bad ? 1 : 0);
}
