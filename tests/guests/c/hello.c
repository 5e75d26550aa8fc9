/* hello: prints a greeting, its command line, its RAM (the e820 map) and CPUs (the ACPI
 * MADT), then exits with the code given by
 * `exit=N` on the command line (default 0): the VMM's exit status is (N << 1) | 1.
 * `port=0x2f8` prints on another UART than COM1. */
#include "rt.h"

void guest_main(const u8 *zero_page) {
    console_port = (u16)cmdline_u64(zero_page, "port", COM1);
    puts("hello from the qomu test guest\n");
    puts("cmdline: ");
    puts(cmdline(zero_page));
    puts("\nram: ");
    putu(e820_ram(zero_page) >> 20);
    puts(" MiB\ncpus: ");
    putu((u64)acpi_cpus());
    puts("\n");
    u64 code = cmdline_u64(zero_page, "exit", 0);
    puts("exiting with code ");
    putu(code);
    puts("\n");
    debug_exit((u8)code);
}
