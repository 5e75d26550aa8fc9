/* The demo guest qomu boots when no kernel is given: it prints a banner, then waits for
 * commands on the serial console. It also notices the ACPI power button (system_powerdown)
 * by polling the Generic Event Device, and powers off. */
#include "rt.h"

static const u8 *zp;

static int streq(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}

static int starts(const char *s, const char *prefix) {
    while (*prefix && *s == *prefix) s++, prefix++;
    return !*prefix;
}

static u64 number(const char *s) {
    u64 v = 0;
    while (*s == ' ') s++;
    while (*s >= '0' && *s <= '9') v = v * 10 + (u64)(*s++ - '0');
    return v;
}

static void help(void) {
    puts("commands:\n"
         "  help          this list\n"
         "  info          memory and command line\n"
         "  count N       count to N\n"
         "  cmos          seconds, minutes, hours from the RTC\n"
         "  reset         reset through the keyboard controller\n"
         "  poweroff      ACPI power off\n"
         "  exit N        leave through isa-debug-exit with code N\n");
}

static void poweroff(void) {
    puts("demo: powering off\n");
    acpi_poweroff();
}

static void run(const char *line) {
    if (streq(line, "")) {
    } else if (streq(line, "help")) {
        help();
    } else if (streq(line, "info")) {
        puts("ram: ");
        putu(e820_ram(zp) >> 20);
        puts(" MiB\ncmdline: ");
        puts(cmdline(zp));
        puts("\n");
    } else if (starts(line, "count")) {
        u64 n = number(line + 5);
        for (u64 i = 1; i <= n; i++) {
            putu(i);
            puts(i == n ? "\n" : " ");
        }
    } else if (streq(line, "cmos")) {
        puts("rtc: ");
        putx(cmos_read(4));
        puts(":");
        putx(cmos_read(2));
        puts(":");
        putx(cmos_read(0));
        puts(" (BCD)\n");
    } else if (streq(line, "reset")) {
        puts("demo: resetting\n");
        i8042_reset();
        for (;;) {
        }
    } else if (streq(line, "poweroff")) {
        poweroff();
    } else if (starts(line, "exit")) {
        debug_exit((u8)number(line + 4));
    } else {
        puts("unknown command: ");
        puts(line);
        puts(" (try help)\n");
    }
}

void guest_main(const u8 *zero_page) {
    char line[80];
    unsigned len = 0;
    zp = zero_page;
    puts("\nqomu demo guest: a 64-bit guest with ");
    putu(e820_ram(zp) >> 20);
    puts(" MiB of RAM, talking over the 16550 serial port\n");
    help();
    puts("> ");
    for (;;) {
        if (mmio_read32(GED_MMIO) & 1) {
            puts("\ndemo: power button pressed\n");
            poweroff();
        }
        if (!serial_has_input()) {
            delay(2000);
            continue;
        }
        char c = serial_getc();
        if (c == '\r' || c == '\n') {
            puts("\n");
            line[len] = 0;
            run(line);
            len = 0;
            puts("> ");
        } else if ((c == 8 || c == 127) && len > 0) {
            len--;
            puts("\b \b");
        } else if (c >= ' ' && len < sizeof(line) - 1) {
            line[len++] = c;
            putc(c);
        }
    }
}
