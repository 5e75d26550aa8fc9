/* virtio: a PCI and virtio driver, polled (no interrupts on every host, see kvm-here.md).
 *
 * Scans the root bus through ports 0xcf8/0xcfc and through ECAM (both must agree), prints
 * `pci SLOT VENDOR:DEVICE` for each function, then brings up every virtio device as a
 * virtio 1.x driver does: reset, ACKNOWLEDGE, DRIVER, features (VERSION_1, and EVENT_IDX
 * unless `event_idx=0`), FEATURES_OK, queues, DRIVER_OK, and uses it, notifying the device
 * only when it asks to be (as Linux does: with EVENT_IDX, when the new buffer passes the
 * device's avail_event; without, unless the used ring's NO_NOTIFY flag is set), so a device
 * that stops asking leaves a request unserved and the step fails. First it checks the VIRTIO_PCI_CAP_PCI_CFG window (the
 * common structure reached through ports 0xcf8/0xcfc alone). Then:
 *   virtio-rng: reads 32 bytes of entropy twice, prints them, checks they are not all zero
 *               and differ. With `msix=1` it turns MSI-X on first (queue on vector 1,
 *               its entry masked): the first interrupt must wait in the PBA until the
 *               entry is unmasked, the second go at once, and the ISR stay clear.
 *   virtio-blk: prints the capacity and the serial (get-id), prints the text at the start
 *               of sector 0, writes "written by the qomu test guest" to sector `wsector=N`
 *               (default 1) unless the device is read-only, reads it back, flushes; on a
 *               read-only device checks that a write fails with IOERR; and checks that a
 *               read past the end fails with IOERR.
 * With `counter=N`, it then counts to N in RAM and on the block device (sector 2): each step
 * reads the disk's count, checks it equals the RAM count, adds one to both and writes the
 * disk back, printing `counter: K` every 100 steps and spinning `spin=S` between steps; at
 * the end it checks a 64 KiB RAM pattern set at the start and prints `counter: done N`.
 * A snapshot taken on the way and restored elsewhere must continue the count (the test of
 * snapshot/restore): any lost RAM or disk state fails a check. With `dirty=P` each step
 * also writes the count into P pages from 32 MiB, all checked at the end (live migration).
 * With `bench=MIB` (scripts/bench blk), it reads then writes MIB MiB of the disk in
 * requests of `breq=KIB` KiB (default 1024), `depth=N` in flight (default 4, at most 5),
 * `rounds=N` times, printing `bench: read start` / `read done` / `write start` / `write done`
 * around each pass, then makes `lat=N` 4 KiB reads one at a time and prints the median time
 * stamp counter ticks from its notify write to seeing the used element.
 * With `slow=1`, it starts vCPU 1 counting in RAM (printing the counter's address), waits
 * for a byte of serial input, reads a sector, and checks vCPU 1 counted on meanwhile.
 *   virtio-net: takes MAC, STATUS, CTRL_VQ and CTRL_RX, turns promiscuous mode off and
 *               all-multicast on over the control queue, then as 10.0.2.15 asks for 10.0.2.2 by ARP, pings it and
 *               sends it a UDP datagram from port 4444 to 5555, waiting for each answer
 *               (other frames are counted and dropped); with `netlink=1` it then waits
 *               for the link to go down and up again (status field and config ISR bit),
 *               turns all-multicast off, and resets the device at the end; `nettraffic=0` skips the traffic.
 *               With `netbench=N` (scripts/bench net), after the echo reply: N frames
 *               sent with the ring's 256 in flight, N/4 with 8, frames counted as the
 *               host sends them, and the median round trip of 101 pings, each printed
 *               with its time stamp counter ticks. Its receive and transmit queues have
 *               256 entries (Linux's and QEMU's default), its other queues 16.
 * With `hotplug=N`, it then serves hotplug as the DSDT's GED _EVT and PCNT methods would,
 * polling the GED: brings up each slot the host adds, ejects each slot the host asks for,
 * and ends after N ejects.
 * Ends through isa-debug-exit: 0 if at least `min=N` (default 1) virtio devices were found
 * and every one worked, else the number of the first failed step. */
#include "rt.h"

#define ECAM 0xe0000000UL
#define VIRTIO_VENDOR 0x1af4

/* ---- configuration space ---- */

static u32 cf8_read32(u8 slot, u8 reg) {
    outl(0xcf8, 0x80000000u | ((u32)slot << 11) | reg);
    return inl(0xcfc);
}

static void cf8_write32(u8 slot, u8 reg, u32 v) {
    outl(0xcf8, 0x80000000u | ((u32)slot << 11) | reg);
    outl(0xcfc, v);
}
static void cf8_write8(u8 slot, u8 reg, u8 v) {
    outl(0xcf8, 0x80000000u | ((u32)slot << 11) | (reg & ~3u));
    outb(0xcfc + (reg & 3), v);
}

static u32 cfg_read32(u8 slot, u16 reg) { return mmio_read32(ECAM + ((u64)slot << 15) + reg); }
static u8 cfg_read8(u8 slot, u16 reg) { return mmio_read8(ECAM + ((u64)slot << 15) + reg); }
static void cfg_write16(u8 slot, u16 reg, u16 v) {
    *(volatile u16 *)(ECAM + ((u64)slot << 15) + reg) = v;
}

/* ---- the virtio structures one device exposes ---- */

struct vdev {
    u8 slot;
    u64 common, isr, device, notify;
    u32 notify_mult;
    u8 common_bar, window; /* the common structure's BAR; the PCI_CFG capability */
    u32 common_offset;
    u32 features; /* the low feature word accepted */
};

#define F_EVENT_IDX (1u << 29)
static int use_event_idx = 1;

#define COMMON_DFSELECT 0x00
#define COMMON_DF 0x04
#define COMMON_GFSELECT 0x08
#define COMMON_GF 0x0c
#define COMMON_MSIX_CONFIG 0x10
#define COMMON_NUMQ 0x12
#define COMMON_STATUS 0x14
#define COMMON_Q_SELECT 0x16
#define COMMON_Q_SIZE 0x18
#define COMMON_Q_ENABLE 0x1c
#define COMMON_Q_MSIX 0x1a
#define COMMON_Q_NOFF 0x1e
#define COMMON_Q_DESC 0x20
#define COMMON_Q_AVAIL 0x28
#define COMMON_Q_USED 0x30

static inline void w16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void w32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void full_barrier(void) { __asm__ volatile("mfence" ::: "memory"); }

static u64 bar_address(u8 slot, u8 bar) {
    u32 low = cfg_read32(slot, 0x10 + 4 * bar);
    u64 addr = low & ~0xfu;
    if ((low & 6) == 4) addr |= (u64)cfg_read32(slot, 0x14 + 4 * bar) << 32;
    return addr;
}

/* Finds the structures through the vendor capabilities; 0 on success. */
static int find_structures(struct vdev *d) {
    u8 at = cfg_read8(d->slot, 0x34);
    d->common = d->isr = d->device = d->notify = 0;
    d->window = 0;
    while (at) {
        if (cfg_read8(d->slot, at) == 0x09 && cfg_read8(d->slot, at + 3) == 5) {
            d->window = at;
        } else if (cfg_read8(d->slot, at) == 0x09) {
            u8 type = cfg_read8(d->slot, at + 3);
            if (type == 1) {
                d->common_bar = cfg_read8(d->slot, at + 4);
                d->common_offset = cfg_read32(d->slot, at + 8);
            }
            u64 where = bar_address(d->slot, cfg_read8(d->slot, at + 4)) + cfg_read32(d->slot, at + 8);
            if (type == 1) d->common = where;
            if (type == 2) {
                d->notify = where;
                d->notify_mult = cfg_read32(d->slot, at + 16);
            }
            if (type == 3) d->isr = where;
            if (type == 4) d->device = where;
        }
        at = cfg_read8(d->slot, at + 1);
    }
    return d->common && d->isr && d->notify ? 0 : 1;
}

/* Reaches the common structure through the VIRTIO_PCI_CAP_PCI_CFG window over ports
 * 0xcf8/0xcfc only, as firmware without BAR mappings would: selects device feature word 1
 * (a write), reads it (VERSION_1) and num_queues (a 2-byte read), and compares both with
 * the BAR. 0 on success, else the failed step. */
static int check_window(struct vdev *d) {
    u8 s = d->slot, w = d->window;
    if (!w) return 6;
    cf8_write8(s, w + 4, d->common_bar);
    cf8_write32(s, w + 8, d->common_offset + COMMON_DFSELECT);
    cf8_write32(s, w + 12, 4);
    cf8_write32(s, w + 16, 1);
    cf8_write32(s, w + 8, d->common_offset + COMMON_DF);
    u32 high = cf8_read32(s, w + 16);
    if (!(high & 1) || mmio_read32(d->common + COMMON_DFSELECT) != 1) return 7;
    if (mmio_read32(d->common + COMMON_DF) != high) return 7;
    cf8_write32(s, w + 8, d->common_offset + COMMON_NUMQ);
    cf8_write32(s, w + 12, 2);
    if ((u16)cf8_read32(s, w + 16) != mmio_read16(d->common + COMMON_NUMQ)) return 8;
    puts("virtio: pci-cfg window ok\n");
    return 0;
}

/* ---- split virtqueues: 16 entries, 256 for a NIC's receive and transmit queues (as Linux
 * has them, so that the net bench can keep a full ring in flight) ---- */

#define QSIZE 16
#define QSIZE_MAX 256
struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags, idx, ring[]; };       /* then used_event */
struct used_elem { u32 id, len; };
struct used { u16 flags, idx; struct used_elem ring[]; }; /* then avail_event */
struct queue {
    struct desc *desc;
    struct avail *avail;
    struct used *used;
    u16 size;
    u16 last_used;
    u64 notify_at;
    int event_idx;
};
/* The rings of a queue of QSIZE_MAX: 16 * 256 + 6 + 2 * 256 (+ 2 to align) + 6 + 8 * 256. */
#define RING_BYTES 8192

static struct queue queues[6];
static u64 ring_mem[6][RING_BYTES / 8] __attribute__((aligned(4096)));

static inline volatile u16 *used_event(struct queue *q) { return &q->avail->ring[q->size]; }
static inline volatile u16 *avail_event(struct queue *q) { return (volatile u16 *)&q->used->ring[q->size]; }

/* Sets up queue `index` of `size` entries (a power of 2, at most QSIZE_MAX) in the rings of
 * queues[slot]. */
static int setup_queue(struct vdev *d, u16 index, struct queue *q, u16 size) {
    u64 c = d->common;
    w16(c + COMMON_Q_SELECT, index);
    u16 max = mmio_read16(c + COMMON_Q_SIZE);
    if (max < size || size > QSIZE_MAX) return 1;
    w16(c + COMMON_Q_SIZE, size);
    volatile u64 *mem = ring_mem[q - queues];
    for (u32 i = 0; i < RING_BYTES / 8; i++) mem[i] = 0;
    u64 base = (u64)mem;
    u64 used = (base + 16 * size + 6 + 2 * size + 3) & ~3ull;
    *q = (struct queue){(struct desc *)base, (struct avail *)(base + 16 * size), (struct used *)used, size, 0, 0, 0};
    /* 64-bit fields written as two halves, as Linux does. */
    w32(c + COMMON_Q_DESC, (u32)(u64)q->desc);
    w32(c + COMMON_Q_DESC + 4, (u32)((u64)q->desc >> 32));
    w32(c + COMMON_Q_AVAIL, (u32)(u64)q->avail);
    w32(c + COMMON_Q_AVAIL + 4, 0);
    w32(c + COMMON_Q_USED, (u32)(u64)q->used);
    w32(c + COMMON_Q_USED + 4, 0);
    q->notify_at = d->notify + (u64)mmio_read16(c + COMMON_Q_NOFF) * d->notify_mult;
    q->event_idx = (d->features & F_EVENT_IDX) != 0;
    w16(c + COMMON_Q_ENABLE, 1);
    return mmio_read16(c + COMMON_Q_ENABLE) == 1 ? 0 : 2;
}

/* Offers `n` descriptors as one chain, notifies if the device asks for it, and polls until
 * the device uses it. Returns the length the device wrote, or -1 after a long wait. The
 * device serves the queue on a host thread of its own: the store of avail.idx must be
 * visible before avail_event or the flags are read (a full barrier, as Linux's
 * virtio_mb()); x86 keeps stores in order and loads in order otherwise. */
/* How long a request may take: about 30 s at 3 GHz (the tests' own limits end it sooner). */
#define REQUEST_TIMEOUT_TSC 100000000000ULL

/* Makes the `n` chains at `heads` available at once and notifies the device if it asks to
 * be (Linux's vring_need_event() with EVENT_IDX, the NO_NOTIFY flag without). Returns the
 * time stamp of the notification, or 0 if the device did not want one. */
static u64 offer_many(struct queue *q, u16 qindex, const u16 *heads, u16 n) {
    u16 old = q->avail->idx, now = (u16)(old + n);
    for (u16 i = 0; i < n; i++) q->avail->ring[(u16)(old + i) & (q->size - 1)] = heads[i];
    /* With EVENT_IDX, an interrupt for the next used buffer, as Linux asks. */
    *used_event(q) = q->last_used;
    barrier();
    q->avail->idx = now;
    full_barrier();
    int kick;
    if (q->event_idx) {
        /* Kick if the device's avail_event lies in [old, now). */
        u16 event = *avail_event(q);
        kick = (u16)(now - event - 1) < (u16)(now - old);
    } else {
        kick = !(*(volatile u16 *)&q->used->flags & 1);
    }
    if (!kick) return 0;
    u64 at = rdtsc();
    w16(q->notify_at, qindex);
    return at;
}

static u64 offer(struct queue *q, u16 qindex, u16 head) { return offer_many(q, qindex, &head, 1); }

/* The next used element, if the device has returned one: 1 and its id and length. */
static int take_used(struct queue *q, u32 *id, u32 *len) {
    barrier();
    if (*(volatile u16 *)&q->used->idx == q->last_used) return 0;
    *id = q->used->ring[q->last_used & (q->size - 1)].id;
    *len = q->used->ring[q->last_used & (q->size - 1)].len;
    q->last_used++;
    return 1;
}

/* Offers descriptors 0.. as one chain and polls until the device uses it. Returns the
 * length the device wrote, or -1 after a long wait. */
static long submit(struct queue *q, u16 qindex, u16 n) {
    offer(q, qindex, 0);
    /* The device serves on its own thread: wait by the clock, not by a count of spins that
     * a fast host would get through in milliseconds. */
    u32 id, len;
    for (u64 start = rdtsc(); rdtsc() - start < REQUEST_TIMEOUT_TSC;)
        if (take_used(q, &id, &len)) return len;
    (void)n;
    return -1;
}

/* Reset, ACKNOWLEDGE, DRIVER, VERSION_1 (and EVENT_IDX unless event_idx=0), FEATURES_OK.
 * 0 on success. */
static int negotiate(struct vdev *d, u32 wanted_low) {
    u64 c = d->common;
    mmio_write8(c + COMMON_STATUS, 0);
    if (mmio_read8(c + COMMON_STATUS) != 0) return 1;
    mmio_write8(c + COMMON_STATUS, 1);
    mmio_write8(c + COMMON_STATUS, 1 | 2);
    w32(c + COMMON_DFSELECT, 1);
    u32 high = mmio_read32(c + COMMON_DF);
    if (!(high & 1)) return 2; /* no VERSION_1 */
    w32(c + COMMON_DFSELECT, 0);
    if (use_event_idx) wanted_low |= F_EVENT_IDX;
    u32 low = mmio_read32(c + COMMON_DF) & wanted_low;
    d->features = low;
    w32(c + COMMON_GFSELECT, 0);
    w32(c + COMMON_GF, low);
    w32(c + COMMON_GFSELECT, 1);
    w32(c + COMMON_GF, 1);
    mmio_write8(c + COMMON_STATUS, 1 | 2 | 8);
    if (!(mmio_read8(c + COMMON_STATUS) & 8)) return 3;
    return 0;
}

static void driver_ok(struct vdev *d) { mmio_write8(d->common + COMMON_STATUS, 1 | 2 | 8 | 4); }

/* ---- devices ---- */

static u8 entropy[2][32];
static int use_msix;
static int net_watch_link;
static int net_traffic = 1;
static u64 net_bench;

/* With msix=1: MSI-X on, the queue on vector 1, whose entry starts masked. */
struct msix { u64 table, pba; };
static int setup_msix(struct vdev *d, struct msix *m) {
    u8 at = cfg_read8(d->slot, 0x34);
    while (at && cfg_read8(d->slot, at) != 0x11) at = cfg_read8(d->slot, at + 1);
    if (!at) return 16;
    u16 control = (u16)cfg_read32(d->slot, at + 2);
    if ((control & 0x7ff) + 1 != 2) return 16; /* config + one queue */
    u32 t = cfg_read32(d->slot, at + 4), p = cfg_read32(d->slot, at + 8);
    m->table = bar_address(d->slot, t & 7) + (t & ~7u);
    m->pba = bar_address(d->slot, p & 7) + (p & ~7u);
    cfg_write16(d->slot, at + 2, control | 0x8000);
    if (!((u16)cfg_read32(d->slot, at + 2) & 0x8000)) return 16;
    w32(m->table + 16, 0xfee00000); /* entry 1: the boot CPU, vector 0x41 */
    w32(m->table + 20, 0);
    w32(m->table + 24, 0x41);
    w32(m->table + 28, 1); /* masked */
    u64 c = d->common;
    w16(c + COMMON_MSIX_CONFIG, 7); /* the table has no entry 7 */
    if (mmio_read16(c + COMMON_MSIX_CONFIG) != 0xffff) return 17;
    w16(c + COMMON_MSIX_CONFIG, 0);
    w16(c + COMMON_Q_SELECT, 0);
    w16(c + COMMON_Q_MSIX, 1);
    if (mmio_read16(c + COMMON_MSIX_CONFIG) != 0 || mmio_read16(c + COMMON_Q_MSIX) != 1) return 17;
    return 0;
}

static int use_rng(struct vdev *d) {
    struct queue *q = &queues[0];
    struct msix m = {0, 0};
    if (negotiate(d, 0)) return 10;
    if (use_msix) {
        int e = setup_msix(d, &m);
        if (e) return e;
    }
    if (setup_queue(d, 0, q, QSIZE)) return 11;
    driver_ok(d);
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < 32; i++) entropy[round][i] = 0;
        q->desc[0].addr = (u64)entropy[round];
        q->desc[0].len = 32;
        q->desc[0].flags = 2; /* device writes */
        long n = submit(q, 0, 1);
        if (n != 32) return 12;
        if (use_msix) {
            if (mmio_read8(d->isr) != 0) return 18; /* MSI-X, not INTx */
            /* Round 0: the entry is masked, so the message waits in the PBA until it is
             * unmasked; round 1: sent at once. */
            u64 pending = mmio_read64(m.pba);
            if (pending != (round == 0 ? 2 : 0)) return 19;
            if (round == 0) {
                w32(m.table + 28, 0);
                if (mmio_read64(m.pba) != 0) return 19;
            }
            continue;
        }
        /* The ISR says "queue" once. The device publishes the used entry first and then
         * sets the ISR and raises INTx, as the spec orders it; a driver reads the ISR in
         * its interrupt handler, after both. Polling the used ring instead, this guest can
         * get there between the two, so it waits for the bit (bounded) as it would wait
         * for the interrupt. */
        u8 isr = 0;
        for (long spin = 0; spin < 10000000 && !(isr = mmio_read8(d->isr)); spin++) {
        }
        if (!(isr & 1)) return 13;
        if (mmio_read8(d->isr) != 0) return 14; /* and reading cleared it */
    }
    if (use_msix) puts("virtio-rng: msi-x ok\n");
    int nonzero = 0, differ = 0;
    puts("virtio-rng: ");
    for (int i = 0; i < 32; i++) {
        nonzero |= entropy[0][i];
        differ |= entropy[0][i] ^ entropy[1][i];
        putx(entropy[0][i]);
        putc(i == 31 ? '\n' : ' ');
    }
    if (!nonzero || !differ) return 15;
    puts("virtio-rng: ok\n");
    return 0;
}

struct blk_header { u32 type, reserved; u64 sector; };
static struct blk_header blk_hdr;
static u8 blk_data[512];
static u8 blk_status;
static const char blk_text[] = "written by the qomu test guest";
static u64 write_sector = 1;
static int have_blk;
static u64 blk_sectors;

/* One request: header, 512 bytes of data (device-written for reads), status. */
static int blk_request(struct queue *q, u32 type, u64 sector, int data_len, int device_writes) {
    blk_hdr.type = type;
    blk_hdr.reserved = 0;
    blk_hdr.sector = sector;
    blk_status = 0xff;
    /* Without data the header chains straight to the status. */
    q->desc[0] = (struct desc){(u64)&blk_hdr, sizeof blk_hdr, 1, data_len ? 1 : 2};
    if (data_len)
        q->desc[1] = (struct desc){(u64)blk_data, (u32)data_len, (u16)(1 | (device_writes ? 2 : 0)), 2};
    q->desc[2] = (struct desc){(u64)&blk_status, 1, 2, 0};
    if (submit(q, 0, 3) < 1) return -1;
    return *(volatile u8 *)&blk_status;
}

static int use_blk(struct vdev *d) {
    struct queue *q = &queues[1];
    if (negotiate(d, (1u << 5) | (1u << 9))) return 20; /* RO, FLUSH */
    w32(d->common + COMMON_GFSELECT, 0);
    int read_only = (mmio_read32(d->common + COMMON_GF) >> 5) & 1;
    if (setup_queue(d, 0, q, QSIZE)) return 21;
    driver_ok(d);
    u64 capacity = mmio_read64(d->device);
    puts("virtio-blk: ");
    putu(capacity);
    puts(" sectors");
    if (read_only) puts(", read-only");
    puts("\n");
    for (int i = 0; i < 21; i++) blk_data[i] = 0;
    if (blk_request(q, 8, 0, 20, 1) != 0) return 22;
    puts("virtio-blk: serial ");
    puts((const char *)blk_data);
    puts("\n");
    if (blk_request(q, 0, 0, 512, 1) != 0) return 23;
    blk_data[63] = 0;
    puts("virtio-blk: sector 0: ");
    puts((const char *)blk_data);
    puts("\n");
    for (int i = 0; i < 512; i++) blk_data[i] = i < (int)sizeof blk_text ? (u8)blk_text[i] : 0;
    int st = blk_request(q, 1, write_sector, 512, 0);
    if (read_only) {
        if (st != 1) return 24; /* IOERR */
        puts("virtio-blk: write refused\n");
    } else {
        if (st != 0) return 25;
        for (int i = 0; i < 512; i++) blk_data[i] = 0;
        if (blk_request(q, 0, write_sector, 512, 1) != 0) return 26;
        for (int i = 0; i < (int)sizeof blk_text; i++)
            if (blk_data[i] != (u8)blk_text[i]) return 27;
        if (blk_request(q, 4, 0, 0, 0) != 0) return 28;
        puts("virtio-blk: wrote, read back, flushed\n");
    }
    if (blk_request(q, 0, capacity, 512, 1) != 1) return 29;
    have_blk = 1;
    blk_sectors = capacity;
    puts("virtio-blk: ok\n");
    return 0;
}

/* ---- virtio-net: ARP, ICMP echo and UDP with the host at 10.0.2.2 ---- */

#define NET_F_MAC (1u << 5)
#define NET_F_STATUS (1u << 16)
#define NET_F_CTRL_VQ (1u << 17)
#define NET_F_CTRL_RX (1u << 18)
#define NET_HDR 12
#define NET_QSIZE 256 /* Linux's default for both queues, and QEMU's */
#define NET_BUFS NET_QSIZE
#define NET_BUF 2048
#define NET_TIMEOUT_TSC 30000000000ULL /* about 10 s at 3 GHz */

static u8 net_rx[NET_BUFS][NET_BUF] __attribute__((aligned(64)));
static u8 net_tx[NET_BUF] __attribute__((aligned(64)));
static u8 net_ctrl[4], net_ack;
static u8 net_mac[6], host_mac[6];
static const u8 guest_ip[4] = {10, 0, 2, 15}, host_ip[4] = {10, 0, 2, 2};
static u32 net_frames_sent, net_frames_seen;

static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static int same(const u8 *a, const u8 *b, int n) {
    for (int i = 0; i < n; i++)
        if (a[i] != b[i]) return 0;
    return 1;
}
static void copy(u8 *to, const u8 *from, int n) {
    for (int i = 0; i < n; i++) to[i] = from[i];
}
static u16 ip_checksum(const u8 *p, int n) {
    u32 sum = 0;
    for (int i = 0; i + 1 < n; i += 2) sum += get16(p + i);
    if (n & 1) sum += (u32)p[n - 1] << 8;
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}
static void putmac(const u8 *m) {
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 6; i++) {
        putc(digits[m[i] >> 4]);
        putc(digits[m[i] & 15]);
        if (i < 5) putc(':');
    }
}

/* Sends the frame of `len` bytes at net_tx + NET_HDR (the header zeroed: no offloads). */
static int net_send(struct queue *tx, u32 len) {
    for (int i = 0; i < NET_HDR; i++) net_tx[i] = 0;
    tx->desc[0] = (struct desc){(u64)net_tx, NET_HDR + len, 0, 0};
    if (submit(tx, 1, 1) < 0) return -1;
    net_frames_sent++;
    return 0;
}

/* An Ethernet frame to `dest` of `type`, from the NIC: its payload's start. */
static u8 *eth(const u8 *dest, u16 type) {
    u8 *f = net_tx + NET_HDR;
    copy(f, dest, 6);
    copy(f + 6, net_mac, 6);
    put16(f + 12, type);
    return f + 14;
}

/* An IPv4 header to the host for `proto` with `payload` bytes after it: where they go. */
static u8 *ipv4(u8 proto, u16 payload) {
    u8 *ip = eth(host_mac, 0x0800);
    ip[0] = 0x45; ip[1] = 0;
    put16(ip + 2, (u16)(20 + payload));
    put16(ip + 4, 0x5155); put16(ip + 6, 0x4000);
    ip[8] = 64; ip[9] = proto;
    put16(ip + 10, 0);
    copy(ip + 12, guest_ip, 4);
    copy(ip + 16, host_ip, 4);
    put16(ip + 10, ip_checksum(ip, 20));
    return ip + 20;
}

/* Offers receive buffer `i` to the device. */
static void net_offer_rx(struct queue *rx, u16 i) {
    rx->desc[i] = (struct desc){(u64)net_rx[i], NET_BUF, 2, 0};
    offer(rx, 0, i);
}

/* Waits for a frame `want` accepts (others are dropped and their buffers offered again);
 * the frame (after the header) and its length, or 0 after NET_TIMEOUT_TSC. */
typedef int (*net_match)(const u8 *frame, u32 len);
static const u8 *net_wait(struct queue *rx, net_match want, u32 *len_out) {
    for (u64 start = rdtsc(); rdtsc() - start < NET_TIMEOUT_TSC;) {
        u32 id, len;
        if (!take_used(rx, &id, &len)) continue;
        if (id >= NET_BUFS) return 0;
        net_frames_seen++;
        static u8 frame[NET_BUF];
        u32 n = len > NET_HDR ? len - NET_HDR : 0;
        copy(frame, net_rx[id] + NET_HDR, (int)n);
        u16 buffers = (u16)(net_rx[id][10] | net_rx[id][11] << 8);
        net_offer_rx(rx, (u16)id);
        if (buffers != 1) return 0; /* without MRG_RXBUF the device must say 1 */
        if (want(frame, n)) {
            *len_out = n;
            return frame;
        }
    }
    return 0;
}

static int is_arp_reply(const u8 *f, u32 n) {
    return n >= 42 && get16(f + 12) == 0x0806 && get16(f + 20) == 2 && same(f + 28, host_ip, 4) &&
           same(f + 38, guest_ip, 4);
}
static int is_echo_reply(const u8 *f, u32 n) {
    return n >= 42 && get16(f + 12) == 0x0800 && f[23] == 1 && same(f + 26, host_ip, 4) &&
           f[34] == 0 && get16(f + 38) == 0x5155 && get16(f + 40) == 1;
}
static int is_udp_reply(const u8 *f, u32 n) {
    return n >= 42 && get16(f + 12) == 0x0800 && f[23] == 17 && same(f + 26, host_ip, 4) &&
           get16(f + 34) == 5555 && get16(f + 36) == 4444;
}

static u16 net_status(struct vdev *d) { return mmio_read16(d->device + 6); }

/* VIRTIO_NET_CTRL_RX command `cmd` (0 promiscuous, 1 all-multicast, ...) set to `on`
 * over the control queue; 0 if the device acked it. */
static int net_rx_mode(struct queue *ctrl, u8 cmd, u8 on) {
    net_ctrl[0] = 0; net_ctrl[1] = cmd; net_ctrl[2] = on;
    net_ack = 0xff;
    ctrl->desc[0] = (struct desc){(u64)net_ctrl, 3, 1, 1};
    ctrl->desc[1] = (struct desc){(u64)&net_ack, 1, 2, 0};
    return submit(ctrl, 2, 2) == 1 && net_ack == 0 ? 0 : 1;
}

/* ---- netbench=N (scripts/bench net): frames each way and the round trip ---- */

#define BENCH_TYPE 0x88b5 /* IEEE 802 local experimental ethertype */
#define BENCH_FRAME 1514

/* N frames of BENCH_FRAME bytes to a MAC nobody has (the host's kernel drops them at
 * once), `depth` in flight (at most the ring's size), the slots the device returned offered
 * again in one batch (as Linux offers a backlog under load: xmit_more, one notify at its
 * end); the time stamp counter ticks from the first to the last. */
static int bench_tx(struct queue *tx, u64 n, u16 depth, u64 *ticks) {
    static const u8 nobody[6] = {0x02, 0, 0, 0, 0, 0x01};
    u8 *payload = eth(nobody, BENCH_TYPE);
    for (int i = 0; i < BENCH_FRAME - 14; i++) payload[i] = (u8)i;
    for (int i = 0; i < NET_HDR; i++) net_tx[i] = 0;
    /* Every slot's descriptor points at the same frame. */
    static u16 heads[NET_QSIZE], free_heads[NET_QSIZE];
    for (u16 i = 0; i < tx->size; i++) tx->desc[i] = (struct desc){(u64)net_tx, NET_HDR + BENCH_FRAME, 0, 0};
    if (depth > tx->size) depth = tx->size;
    for (u16 i = 0; i < depth; i++) free_heads[i] = i;
    u64 sent = 0, done = 0, start = rdtsc();
    u16 free_count = depth;
    while (done < n) {
        u16 k = 0;
        while (sent < n && free_count) {
            heads[k++] = free_heads[--free_count];
            sent++;
        }
        if (k) offer_many(tx, 1, heads, k);
        u32 id, len;
        for (u64 t = rdtsc(); !take_used(tx, &id, &len);)
            if (rdtsc() - t > REQUEST_TIMEOUT_TSC) return 90;
        do {
            if (id >= tx->size) return 93;
            free_heads[free_count++] = (u16)id;
            done++;
        } while (take_used(tx, &id, &len));
    }
    *ticks = rdtsc() - start;
    return 0;
}

/* Counts BENCH_TYPE frames until one whose first payload byte is 0xff, or 2 s without
 * any, giving the buffers back in batches; the ticks from the first to the last counted. */
static int bench_rx(struct queue *rx, u64 *count, u64 *ticks) {
    u64 first = 0, last = 0, n = 0;
    const u64 idle = NET_TIMEOUT_TSC / 5;
    int end = 0;
    for (u64 seen = rdtsc(); !end && rdtsc() - seen < (n ? idle : 5 * NET_TIMEOUT_TSC);) {
        u32 id, len;
        u16 heads[NET_BUFS], k = 0;
        while (k < NET_BUFS && take_used(rx, &id, &len)) {
            if (id >= NET_BUFS) return 91;
            seen = rdtsc();
            const u8 *f = net_rx[id] + NET_HDR;
            int ours = len >= NET_HDR + 15 && get16(f + 12) == BENCH_TYPE;
            if (ours && f[14] == 0xff) end = 1;
            else if (ours) {
                if (!n) first = seen;
                last = seen;
                n++;
            }
            heads[k++] = (u16)id;
        }
        if (!k) continue;
        net_frames_seen += k;
        for (u16 i = 0; i < k; i++)
            rx->desc[heads[i]] = (struct desc){(u64)net_rx[heads[i]], NET_BUF, 2, 0};
        offer_many(rx, 0, heads, k);
    }
    *count = n;
    *ticks = last - first;
    return 0;
}

static int is_any_echo_reply(const u8 *f, u32 n) {
    return n >= 42 && get16(f + 12) == 0x0800 && f[23] == 1 && f[34] == 0 && get16(f + 38) == 0x5155;
}

/* One ICMP echo at a time, `k` times: the median ticks from the notify write to the reply
 * seen. */
static u64 rtt[256];
static int bench_rtt(struct queue *rx, struct queue *tx, u64 k, u64 *median) {
    if (k > 256) k = 256;
    for (u64 i = 0; i < k; i++) {
        u8 *icmp = ipv4(1, 8);
        icmp[0] = 8; icmp[1] = 0; put16(icmp + 2, 0); put16(icmp + 4, 0x5155); put16(icmp + 6, (u16)i);
        put16(icmp + 2, ip_checksum(icmp, 8));
        for (int j = 0; j < NET_HDR; j++) net_tx[j] = 0;
        tx->desc[0] = (struct desc){(u64)net_tx, NET_HDR + 14 + 20 + 8, 0, 0};
        u64 at = rdtsc();
        offer(tx, 1, 0);
        u32 len;
        if (!net_wait(rx, is_any_echo_reply, &len)) return 92;
        rtt[i] = rdtsc() - at;
        u32 id;
        while (!take_used(tx, &id, &len)) {
        }
    }
    for (u64 i = 1; i < k; i++)
        for (u64 j = i; j > 0 && rtt[j - 1] > rtt[j]; j--) {
            u64 t = rtt[j]; rtt[j] = rtt[j - 1]; rtt[j - 1] = t;
        }
    *median = rtt[k / 2];
    return 0;
}

static int run_net_bench(struct queue *rx, struct queue *tx) {
    u64 ticks, count;
    puts("netbench: tx start\n");
    int failed = bench_tx(tx, net_bench, tx->size, &ticks);
    if (failed) return failed;
    puts("netbench: tx done ");
    putu(net_bench);
    puts(" frames in ");
    putu(ticks);
    puts(" tsc\n");
    /* A quarter as many with 8 in flight: how a shallow queue costs the device. */
    puts("netbench: tx8 start\n");
    if ((failed = bench_tx(tx, net_bench / 4, 8, &ticks))) return failed;
    puts("netbench: tx8 done ");
    putu(net_bench / 4);
    puts(" frames in ");
    putu(ticks);
    puts(" tsc\n");
    puts("netbench: rx ready\n");
    if ((failed = bench_rx(rx, &count, &ticks))) return failed;
    puts("netbench: rx done ");
    putu(count);
    puts(" frames in ");
    putu(ticks);
    puts(" tsc\n");
    u64 median;
    if ((failed = bench_rtt(rx, tx, 101, &median))) return failed;
    puts("netbench: rtt ");
    putu(median);
    puts(" tsc\n");
    return 0;
}

static int use_net(struct vdev *d) {
    struct queue *rx = &queues[2], *tx = &queues[3], *ctrl = &queues[4];
    if (negotiate(d, NET_F_MAC | NET_F_STATUS | NET_F_CTRL_VQ | NET_F_CTRL_RX)) return 70;
    if ((d->features & (NET_F_MAC | NET_F_STATUS | NET_F_CTRL_VQ | NET_F_CTRL_RX)) !=
        (NET_F_MAC | NET_F_STATUS | NET_F_CTRL_VQ | NET_F_CTRL_RX))
        return 71;
    for (int i = 0; i < 6; i++) net_mac[i] = mmio_read8(d->device + i);
    if (setup_queue(d, 0, rx, NET_QSIZE) || setup_queue(d, 1, tx, NET_QSIZE) || setup_queue(d, 2, ctrl, QSIZE))
        return 72;
    driver_ok(d);
    puts("virtio-net: mac ");
    putmac(net_mac);
    puts(net_status(d) & 1 ? " link up\n" : " link down\n");
    /* Every receive buffer at once, as Linux fills its ring when it opens the device. */
    static u16 all[NET_BUFS];
    for (u16 i = 0; i < NET_BUFS; i++) {
        rx->desc[i] = (struct desc){(u64)net_rx[i], NET_BUF, 2, 0};
        all[i] = i;
    }
    offer_many(rx, 0, all, NET_BUFS);
    /* As Linux does when it opens the device: promiscuous mode off; then all-multicast
     * on (a second change of the filter). */
    if (net_rx_mode(ctrl, 0, 0)) return 73;
    puts("virtio-net: promiscuous mode off\n");
    if (net_rx_mode(ctrl, 1, 1)) return 73;
    puts("virtio-net: all-multicast on\n");
    if (!net_traffic) goto done;

    /* ARP: who has 10.0.2.2? */
    static const u8 broadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    u8 *arp = eth(broadcast, 0x0806);
    put16(arp, 1); put16(arp + 2, 0x0800); arp[4] = 6; arp[5] = 4; put16(arp + 6, 1);
    copy(arp + 8, net_mac, 6); copy(arp + 14, guest_ip, 4);
    for (int i = 0; i < 6; i++) arp[18 + i] = 0;
    copy(arp + 24, host_ip, 4);
    if (net_send(tx, 42)) return 74;
    u32 len;
    const u8 *f = net_wait(rx, is_arp_reply, &len);
    if (!f) return 75;
    copy(host_mac, f + 22, 6);
    puts("virtio-net: arp reply: 10.0.2.2 is at ");
    putmac(host_mac);
    puts("\n");

    /* ICMP echo, id 0x5155, sequence 1. */
    static const char ping_data[] = "qomu ping";
    u8 *icmp = ipv4(1, 8 + sizeof ping_data);
    icmp[0] = 8; icmp[1] = 0; put16(icmp + 2, 0); put16(icmp + 4, 0x5155); put16(icmp + 6, 1);
    copy(icmp + 8, (const u8 *)ping_data, sizeof ping_data);
    put16(icmp + 2, ip_checksum(icmp, 8 + sizeof ping_data));
    if (net_send(tx, 14 + 20 + 8 + sizeof ping_data)) return 76;
    if (!net_wait(rx, is_echo_reply, &len)) return 77;
    puts("virtio-net: echo reply from 10.0.2.2\n");
    if (net_bench) {
        int failed = run_net_bench(rx, tx);
        if (failed) return failed;
        goto done;
    }

    /* UDP 4444 -> 10.0.2.2:5555; the host's listener answers. */
    static const char udp_data[] = "hello from the qomu guest";
    u16 udp_len = (u16)(8 + sizeof udp_data - 1);
    u8 *udp = ipv4(17, udp_len);
    put16(udp, 4444); put16(udp + 2, 5555); put16(udp + 4, udp_len); put16(udp + 6, 0);
    copy(udp + 8, (const u8 *)udp_data, sizeof udp_data - 1);
    if (net_send(tx, 14 + 20 + udp_len)) return 78;
    f = net_wait(rx, is_udp_reply, &len);
    if (!f) return 79;
    static char reply[64];
    u32 n = get16(f + 38) - 8;
    if (n > sizeof reply - 1) n = sizeof reply - 1;
    copy((u8 *)reply, f + 42, (int)n);
    reply[n] = 0;
    puts("virtio-net: udp reply: ");
    puts(reply);
    puts("\n");
    puts("virtio-net: sent ");
    putu(net_frames_sent);
    puts(" frames\n");

    /* With netlink=1: the host takes the link down, then up again; the status field and
     * the configuration-change ISR bit show it. */
    if (net_watch_link) {
        puts("virtio-net: watching the link\n");
        for (int want = 0; want < 2; want++) {
            u64 start = rdtsc();
            while ((net_status(d) & 1) != want)
                if (rdtsc() - start > 10 * NET_TIMEOUT_TSC) return 80;
            u8 isr = 0;
            for (long spin = 0; spin < 10000000 && !(isr & 2); spin++) isr |= mmio_read8(d->isr);
            if (!(isr & 2)) return 81;
            puts(want ? "virtio-net: link up\n" : "virtio-net: link down\n");
        }
        /* One more change of the filter, after the host asked for it meanwhile. */
        if (net_rx_mode(ctrl, 1, 0)) return 82;
        puts("virtio-net: all-multicast off\n");
    }
done:
    /* Done: the device is reset, so it writes no more frames into these buffers. */
    mmio_write8(d->common + COMMON_STATUS, 0);
    puts("virtio-net: ok\n");
    return 0;
}

#define COUNTER_SECTOR 2
#define COUNTER_MAGIC 0x544e4351u /* "QCNT" */
static u64 ram_counter;
static u8 ram_pattern[64 * 1024];

/* With `dirty=P`: every counter step also writes the count into the first word of each
 * of P pages from 32 MiB (a guest that keeps writing RAM, for live migration), and the
 * end checks every one holds the last count. */
#define DIRTY_AREA 0x2000000UL
static u64 dirty_pages;
/* The boot parameters' page, zeroed by the counter at its start. */
static u8 *wiped;

static int run_counter(u64 n, u64 spin) {
    struct queue *q = &queues[1];
    if (!have_blk) return 40;
    for (u64 i = 0; i < sizeof ram_pattern; i++) ram_pattern[i] = (u8)(i * 7 + 3);
    puts("counter: start\n");
    while (ram_counter < n) {
        if (blk_request(q, 0, COUNTER_SECTOR, 512, 1) != 0) return 41;
        u32 magic = *(u32 *)blk_data;
        u64 disk = magic == COUNTER_MAGIC ? *(u64 *)(blk_data + 8) : 0;
        if (disk != ram_counter) {
            puts("counter: the disk says ");
            putu(disk);
            puts(", RAM says ");
            putu(ram_counter);
            puts("\n");
            return 42;
        }
        ram_counter++;
        *(u32 *)blk_data = COUNTER_MAGIC;
        *(u64 *)(blk_data + 8) = ram_counter;
        if (blk_request(q, 1, COUNTER_SECTOR, 512, 0) != 0) return 43;
        for (u64 p = 0; p < dirty_pages; p++) *(volatile u64 *)(DIRTY_AREA + p * 4096) = ram_counter;
        if (ram_counter % 100 == 0) {
            puts("counter: ");
            putu(ram_counter);
            puts("\n");
        }
        delay(spin);
    }
    for (u64 i = 0; i < sizeof ram_pattern; i++)
        if (ram_pattern[i] != (u8)(i * 7 + 3)) return 44;
    for (u64 p = 0; p < dirty_pages; p++)
        if (*(volatile u64 *)(DIRTY_AREA + p * 4096) != ram_counter) return 45;
    for (int i = 0; wiped && i < 4096; i++)
        if (wiped[i]) return 47;
    puts("counter: done ");
    putu(n);
    puts("\n");
    return 0;
}

/* ---- bench=MIB: throughput and latency of virtio-blk ---- */

#define BENCH_BUFFERS 0x2000000UL /* 32 MiB: request buffers, clear of the image and stack */
#define BENCH_DEPTH_MAX 5         /* chains of 3 descriptors in a queue of 16 */
static struct blk_header bench_hdr[BENCH_DEPTH_MAX];
static u8 bench_status[BENCH_DEPTH_MAX];

/* Moves `total` bytes between the disk (from sector 0, wrapping at its end) and guest
 * buffers in requests of `req` bytes, `depth` in flight. 0 on success. */
static int bench_pass(u32 type, u64 total, u64 req, u32 depth) {
    struct queue *q = &queues[1];
    u64 sectors = req / 512, requests = total / req, issued = 0, done = 0;
    u32 free_slots = (1u << depth) - 1;
    while (done < requests) {
        while (issued < requests && free_slots) {
            u32 slot = (u32)__builtin_ctz(free_slots);
            free_slots &= ~(1u << slot);
            u16 head = (u16)(slot * 3);
            bench_hdr[slot] = (struct blk_header){type, 0, (issued * sectors) % (blk_sectors - sectors)};
            bench_status[slot] = 0xff;
            q->desc[head] = (struct desc){(u64)&bench_hdr[slot], sizeof bench_hdr[slot], 1, (u16)(head + 1)};
            q->desc[head + 1] = (struct desc){BENCH_BUFFERS + slot * req, (u32)req,
                                              (u16)(1 | (type == 0 ? 2 : 0)), (u16)(head + 2)};
            q->desc[head + 2] = (struct desc){(u64)&bench_status[slot], 1, 2, 0};
            offer(q, 0, head);
            issued++;
        }
        u32 id, len;
        for (u64 start = rdtsc(); !take_used(q, &id, &len);)
            if (rdtsc() - start > REQUEST_TIMEOUT_TSC) return 61;
        u32 slot = id / 3;
        if (slot >= depth || bench_status[slot] != 0) return 62;
        free_slots |= 1u << slot;
        done++;
    }
    return 0;
}

/* `n` 4 KiB reads one at a time: the median of the time stamp counter from the notify
 * write to the used element seen. */
static u64 latencies[1024];

static int bench_latency(u64 n, u64 *median) {
    struct queue *q = &queues[1];
    if (n > 1024) n = 1024;
    /* A read the device was still polling for needs no notify (EVENT_IDX): it measures
     * nothing, and is made again, at most n times in all. */
    u64 unkicked = 0;
    for (u64 i = 0; i < n; i++) {
        bench_hdr[0] = (struct blk_header){0, 0, i % blk_sectors};
        bench_status[0] = 0xff;
        q->desc[0] = (struct desc){(u64)&bench_hdr[0], sizeof bench_hdr[0], 1, 1};
        q->desc[1] = (struct desc){BENCH_BUFFERS, 4096, 3, 2};
        q->desc[2] = (struct desc){(u64)&bench_status[0], 1, 2, 0};
        u64 kicked = offer(q, 0, 0);
        u32 id, len;
        for (u64 start = rdtsc(); !take_used(q, &id, &len);)
            if (rdtsc() - start > REQUEST_TIMEOUT_TSC) return 63;
        u64 seen = rdtsc();
        if (bench_status[0] != 0) return 64;
        if (!kicked) {
            if (++unkicked > n) return 67;
            i--;
            continue;
        }
        latencies[i] = seen - kicked;
    }
    for (u64 i = 1; i < n; i++) /* insertion sort: n is small */
        for (u64 j = i; j > 0 && latencies[j - 1] > latencies[j]; j--) {
            u64 t = latencies[j];
            latencies[j] = latencies[j - 1];
            latencies[j - 1] = t;
        }
    *median = latencies[n / 2];
    return 0;
}

static int run_bench(const u8 *zero_page, u64 mib) {
    if (!have_blk) return 60;
    u64 req = cmdline_u64(zero_page, "breq", 1024) * 1024;
    u32 depth = (u32)cmdline_u64(zero_page, "depth", 4);
    if (depth < 1 || depth > BENCH_DEPTH_MAX || req < 512 || req % 512 || req / 512 >= blk_sectors) return 65;
    if (e820_ram(zero_page) < BENCH_BUFFERS + depth * req) return 66;
    u64 total = mib << 20, rounds = cmdline_u64(zero_page, "rounds", 1);
    int failed;
    for (u64 r = 0; r < rounds; r++) {
        puts("bench: read start\n");
        if ((failed = bench_pass(0, total, req, depth))) return failed;
        puts("bench: read done\n");
        puts("bench: write start\n");
        if ((failed = bench_pass(1, total, req, depth))) return failed;
        puts("bench: write done\n");
    }
    u64 median;
    if ((failed = bench_latency(cmdline_u64(zero_page, "lat", 500), &median))) return failed;
    puts("bench: notify-to-used ");
    putu(median);
    puts(" tsc\n");
    return 0;
}

/* ---- slow=1: a vCPU does not wait for a slow request ---- */

static volatile u64 ap_steps;
static volatile int ap_up;
static u8 ap_stack_area[8192] __attribute__((aligned(16)));

static void ap_main(void) {
    ap_up = 1;
    for (;;) ap_steps++;
}

/* Starts vCPU 1 counting, then, on a byte of serial input (the test makes the disk slow
 * first), reads a sector while the other vCPU counts. 0 if it was read and the count went
 * on meanwhile. */
static int run_slow(void) {
    struct queue *q = &queues[1];
    if (!have_blk) return 50;
    start_ap(1, ap_main, ap_stack_area + sizeof ap_stack_area);
    for (u64 start = rdtsc(); !ap_up;)
        if (rdtsc() - start > REQUEST_TIMEOUT_TSC) return 51;
    puts("slow: vcpu 1 counts at ");
    putx((u64)&ap_steps);
    puts("\n");
    while (!serial_has_input()) {
    }
    (void)serial_getc();
    puts("slow: request sent\n");
    u64 before = ap_steps;
    if (blk_request(q, 0, 0, 512, 1) != 0) return 52;
    u64 counted = ap_steps - before;
    puts("slow: served; vcpu 1 counted ");
    putu(counted);
    puts(" meanwhile\n");
    return counted ? 0 : 53;
}

/* Finds and uses the device in `slot`: 0 if there is none, 1 if it is a virtio device that
 * worked; a failed step ends the guest. */
static int probe(u8 slot) {
    u32 id = cf8_read32(slot, 0);
    if (id != cfg_read32(slot, 0)) {
        puts("pci: 0xcf8 and ECAM disagree\n");
        debug_exit(2);
    }
    if (id == 0xffffffffu) return 0;
    puts("pci ");
    putu(slot);
    puts(" ");
    putx(id & 0xffff);
    puts(":");
    putx(id >> 16);
    puts("\n");
    if ((id & 0xffff) != VIRTIO_VENDOR) return 0;
    struct vdev d = {.slot = slot};
    cfg_write16(slot, 0x04, 0x6); /* memory decoding and bus mastering */
    if (find_structures(&d)) debug_exit(3);
    int failed = check_window(&d);
    if (!failed) switch (id >> 16) {
    case 0x1044: failed = use_rng(&d); break;
    case 0x1042: failed = use_blk(&d); break;
    case 0x1041: failed = use_net(&d); break;
    default: puts("virtio: unknown device\n"); failed = 4;
    }
    if (failed) {
        puts("virtio: failed at step ");
        putu(failed);
        puts("\n");
        debug_exit((u8)failed);
    }
    return 1;
}

#define GED_EVENTS 0xfed00000UL
#define HOTPLUG_PCIU 0xfed01000UL
#define HOTPLUG_PCID 0xfed01004UL
#define HOTPLUG_B0EJ 0xfed01008UL

/* As the DSDT's _EVT and PCNT would, polled: on a hotplug event, brings up each added slot
 * and ejects each slot the host asks for, until `ejects` slots were ejected. The host
 * carries an eject out a little later, and PCID shows the request until then: as OSPM
 * calls _EJ0 once per device, a slot is ejected once until a device is added there again. */
static void serve_hotplug(u64 ejects) {
    puts("hotplug: ready\n");
    u64 done = 0;
    u32 ejected = 0;
    while (done < ejects) {
        if (!(mmio_read32(GED_EVENTS) & 2)) continue;
        u32 up = mmio_read32(HOTPLUG_PCIU), down = mmio_read32(HOTPLUG_PCID);
        for (u8 slot = 1; slot < 32; slot++) {
            if (up & (1u << slot)) {
                puts("hotplug: slot ");
                putu(slot);
                puts(" added\n");
                ejected &= ~(1u << slot);
                probe(slot);
            }
            if (down & ~ejected & (1u << slot)) {
                ejected |= 1u << slot;
                puts("hotplug: ejecting slot ");
                putu(slot);
                puts("\n");
                mmio_write32(HOTPLUG_B0EJ, 1u << slot);
                done++;
            }
        }
    }
    puts("hotplug: ");
    putu(done);
    puts(" ejected\n");
}

void guest_main(const u8 *zero_page) {
    u64 min = cmdline_u64(zero_page, "min", 1);
    write_sector = cmdline_u64(zero_page, "wsector", 1);
    use_msix = (int)cmdline_u64(zero_page, "msix", 0);
    use_event_idx = (int)cmdline_u64(zero_page, "event_idx", 1);
    net_watch_link = (int)cmdline_u64(zero_page, "netlink", 0);
    net_traffic = (int)cmdline_u64(zero_page, "nettraffic", 1);
    net_bench = cmdline_u64(zero_page, "netbench", 0);
    int found = 0;
    for (u8 slot = 0; slot < 32; slot++) found += probe(slot);
    puts("virtio: ");
    putu(found);
    puts(" devices\n");
    if (found < (int)min) debug_exit(5);
    u64 count = cmdline_u64(zero_page, "counter", 0);
    dirty_pages = cmdline_u64(zero_page, "dirty", 0);
    if (dirty_pages && e820_ram(zero_page) < DIRTY_AREA + dirty_pages * 4096) debug_exit(46);
    u64 spin = cmdline_u64(zero_page, "spin", 0);
    u64 bench = cmdline_u64(zero_page, "bench", 0);
    u64 slow = cmdline_u64(zero_page, "slow", 0);
    u64 ejects = cmdline_u64(zero_page, "hotplug", 0);
    if (count) {
        /* The boot parameters, read: zeroed, and checked at the end, so a restored or
         * migrated copy whose RAM kept what its own boot wrote there (where this guest has
         * zeros) fails. */
        wiped = (u8 *)zero_page;
        for (int i = 0; i < 4096; i++) wiped[i] = 0;
        int failed = run_counter(count, spin);
        if (failed) {
            puts("counter: failed at step ");
            putu(failed);
            puts("\n");
            debug_exit((u8)failed);
        }
    }
    int failed = bench && !count ? run_bench(zero_page, bench) : 0;
    if (!failed && slow) failed = run_slow();
    if (failed) {
        puts("virtio: failed at step ");
        putu(failed);
        puts("\n");
        debug_exit((u8)failed);
    }
    if (ejects) serve_hotplug(ejects);
    debug_exit(0);
}
