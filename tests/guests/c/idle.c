/* idle: prints one line and halts for good, as an idle operating system does; the vCPU
 * sleeps in KVM. The QMP benchmark's guest. */
#include "rt.h"

void guest_main(const u8 *zero_page) {
    (void)zero_page;
    puts("idle guest: halting\n");
    for (;;) __asm__ volatile("cli; hlt");
}
