/*
 * The test guests' runtime: port and MMIO access, the serial console, the Linux zero
 * page (command line, e820), CMOS, and the ways to end (debug-exit, ACPI, i8042).
 * Integer-only: the guests run on KVM setups that cannot emulate SSE (see kvm-here.md).
 */
#ifndef QOMU_GUEST_RT_H
#define QOMU_GUEST_RT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define COM1 0x3f8
#define DEBUG_EXIT 0x501
#define I8042_CMD 0x64
#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71
#define ACPI_SLEEP_CTL 0x600
#define ACPI_RESET 0x602
#define GED_MMIO 0xfed00000UL

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline u8 mmio_read8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_read16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline u64 mmio_read64(u64 a) { return *(volatile u64 *)a; }
static inline void mmio_write8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }

/* ---- serial console (a 16550, COM1 unless a guest picks another with `port=`) ---- */

static u16 console_port = COM1;

static inline void putc(char c) {
    while (!(inb(console_port + 5) & 0x20)) {
    }
    outb(console_port, (u8)c);
}

static inline void puts(const char *s) {
    while (*s) {
        if (*s == '\n') putc('\r');
        putc(*s++);
    }
}

static inline void putu(u64 v) {
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts(&buf[i]);
}

static inline void putx(u64 v) {
    static const char digits[] = "0123456789abcdef";
    char buf[19];
    int i = 18;
    buf[i] = 0;
    do {
        buf[--i] = digits[v & 15];
        v >>= 4;
    } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    puts(&buf[i]);
}

/* True if a byte is waiting in the receive buffer. */
static inline int serial_has_input(void) { return inb(console_port + 5) & 1; }
static inline char serial_getc(void) { return (char)inb(console_port); }

/* ---- the Linux zero page ---- */

static inline const char *cmdline(const u8 *zero_page) {
    u64 ptr = *(const u32 *)(zero_page + 0x228) | ((u64) * (const u32 *)(zero_page + 0x0c8) << 32);
    return ptr ? (const char *)ptr : "";
}

/* The value of `key=` on the command line as a number, or `def`. */
static inline u64 cmdline_u64(const u8 *zero_page, const char *key, u64 def) {
    const char *s = cmdline(zero_page);
    while (*s) {
        const char *k = key, *p = s;
        while (*k && *p == *k) k++, p++;
        if (!*k && *p == '=' && (s == cmdline(zero_page) || s[-1] == ' ')) {
            u64 v = 0;
            p++;
            if (p[0] == '0' && p[1] == 'x') {
                for (p += 2;; p++) {
                    if (*p >= '0' && *p <= '9') v = v * 16 + (u64)(*p - '0');
                    else if (*p >= 'a' && *p <= 'f') v = v * 16 + (u64)(*p - 'a' + 10);
                    else break;
                }
            } else {
                for (; *p >= '0' && *p <= '9'; p++) v = v * 10 + (u64)(*p - '0');
            }
            return v;
        }
        s++;
    }
    return def;
}

/* Total RAM in bytes, from the e820 map. */
static inline u64 e820_ram(const u8 *zero_page) {
    u8 n = zero_page[0x1e8];
    u64 total = 0;
    for (u8 i = 0; i < n; i++) {
        const u8 *e = zero_page + 0x2d0 + 20 * i;
        if (*(const u32 *)(e + 16) == 1) total += *(const u64 *)(e + 8);
    }
    return total;
}

/* The number of enabled processors the ACPI MADT lists (as Linux finds its CPUs), found
 * through the RSDP in the BIOS area and the XSDT; 0 if there is none. */
static inline int acpi_cpus(void) {
    const u8 *rsdp = 0;
    for (u64 a = 0xe0000; a < 0x100000; a += 16) {
        const u8 *p = (const u8 *)a;
        if (p[0] == 'R' && p[1] == 'S' && p[2] == 'D' && p[3] == ' ' && p[4] == 'P' &&
            p[5] == 'T' && p[6] == 'R' && p[7] == ' ') {
            rsdp = p;
            break;
        }
    }
    if (!rsdp || rsdp[15] < 2) return 0;
    const u8 *xsdt = (const u8 *)*(const u64 *)(rsdp + 24);
    u32 xsdt_len = *(const u32 *)(xsdt + 4);
    for (u32 off = 36; off + 8 <= xsdt_len; off += 8) {
        const u8 *t = (const u8 *)*(const u64 *)(xsdt + off);
        if (t[0] != 'A' || t[1] != 'P' || t[2] != 'I' || t[3] != 'C') continue;
        u32 len = *(const u32 *)(t + 4);
        int cpus = 0;
        /* Entries after the 44-byte header: type, length; type 0 is a local APIC, whose
         * flags (bit 0: enabled) are at offset 4. */
        for (u32 e = 44; e + 2 <= len && t[e + 1] >= 2; e += t[e + 1])
            if (t[e] == 0 && (*(const u32 *)(t + e + 4) & 1)) cpus++;
        return cpus;
    }
    return 0;
}

/* ---- CMOS (register 0x0e..0x7f are NVRAM, kept across a reset) ---- */

static inline u8 cmos_read(u8 reg) { outb(CMOS_INDEX, reg); return inb(CMOS_DATA); }
static inline void cmos_write(u8 reg, u8 v) { outb(CMOS_INDEX, reg); outb(CMOS_DATA, v); }

/* ---- ending ---- */

/* isa-debug-exit: the VMM exits with status (code << 1) | 1. */
static inline void __attribute__((noreturn)) debug_exit(u8 code) {
    outb(DEBUG_EXIT, code);
    for (;;) __asm__ volatile("hlt");
}

/* ACPI S5 through the hardware-reduced sleep control register. */
static inline void __attribute__((noreturn)) acpi_poweroff(void) {
    outb(ACPI_SLEEP_CTL, (5 << 2) | (1 << 5));
    for (;;) __asm__ volatile("hlt");
}

/* The keyboard controller's CPU reset line. */
static inline void i8042_reset(void) { outb(I8042_CMD, 0xfe); }

static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* A busy delay of about n iterations (no timer interrupts on every host). */
static inline void delay(u64 n) {
    for (volatile u64 i = 0; i < n; i++) {
    }
}

/* ---- application processors ---- */

#define AP_BASE 0x2000UL
#define LAPIC_ICR_LOW 0xfee00300UL
#define LAPIC_ICR_HIGH 0xfee00310UL
extern const u8 ap_trampoline[], ap_trampoline_end[], ap_cr3[], ap_stack[], ap_entry[];

/* Starts the CPU with APIC ID `apic_id` (which the VMM holds in wait-for-SIPI) in long mode,
 * calling `entry` on the stack whose top is `stack_top`, as a BIOS-less kernel does: the
 * trampoline copied to AP_BASE, then INIT and two STARTUP IPIs. */
static inline void start_ap(u8 apic_id, void (*entry)(void), u8 *stack_top) {
    volatile u8 *base = (volatile u8 *)AP_BASE;
    u64 len = (u64)(ap_trampoline_end - ap_trampoline);
    for (u64 i = 0; i < len; i++) base[i] = ap_trampoline[i];
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    *(volatile u64 *)(AP_BASE + (u64)(ap_cr3 - ap_trampoline)) = cr3;
    *(volatile u64 *)(AP_BASE + (u64)(ap_stack - ap_trampoline)) = (u64)stack_top;
    *(volatile u64 *)(AP_BASE + (u64)(ap_entry - ap_trampoline)) = (u64)entry;
    mmio_write32(LAPIC_ICR_HIGH, (u32)apic_id << 24);
    mmio_write32(LAPIC_ICR_LOW, 0x4500); /* INIT, assert */
    delay(1000);
    for (int i = 0; i < 2; i++) {
        mmio_write32(LAPIC_ICR_HIGH, (u32)apic_id << 24);
        mmio_write32(LAPIC_ICR_LOW, 0x4600 | (u32)(AP_BASE >> 12)); /* STARTUP */
        delay(200);
    }
}

#endif
