/* reset: on its first boot asks the keyboard controller for a CPU reset; after the reset
 * (it remembers the boot in CMOS NVRAM, which a reset keeps) it exits with code 2. */
#include "rt.h"

#define BOOTS 0x50

void guest_main(const u8 *zero_page) {
    (void)zero_page;
    u8 boots = cmos_read(BOOTS);
    puts("reset guest: boot ");
    putu(boots + 1);
    puts("\n");
    cmos_write(BOOTS, (u8)(boots + 1));
    if (boots == 0) {
        puts("reset guest: requesting reset\n");
        i8042_reset();
        for (;;) {
            /* The reset takes effect from the VMM's side; wait for it. */
        }
    }
    puts("reset guest: done\n");
    debug_exit(2);
}
