/* bad: prints a line, then executes an instruction KVM cannot carry out: an XSAVE whose
 * memory operand is MMIO. KVM's instruction emulator has no XSAVE, so the VMM must stop
 * the machine in internal-error (never crash). */
#include "rt.h"

void guest_main(const u8 *zero_page) {
    (void)zero_page;
    puts("bad guest: xsave to MMIO\n");
    u64 cr4;
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    cr4 |= 1UL << 18; /* OSXSAVE */
    __asm__ volatile("mov %0, %%cr4" ::"r"(cr4));
    __asm__ volatile("xsave (%0)" ::"r"(0xd0000000UL), "a"(1), "d"(0) : "memory");
    puts("bad guest: still running\n");
    debug_exit(9);
}
