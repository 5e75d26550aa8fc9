//! `scripts/bench blk`: virtio-blk throughput and latency, seen from a driver guest.
//!
//! The `virtio` driver guest in its `bench` mode (tests/guests/c/virtio.c) reads and then
//! writes `MIB` MiB of the disk in requests of each of `REQUESTS_KIB`, `DEPTH` in flight, `ROUNDS`
//! times, then makes
//! `LATENCY_ROUNDS` 4 KiB reads one at a time and reports the median time stamp counter
//! ticks from its notify write to seeing the used element. The figures:
//!
//! - `blk_read_mib_per_s`, `blk_write_mib_per_s`: the guest's passes, timed between the
//!   console lines that start and end them (the serial `line` notifier's time stamps);
//! - `host_read_mib_per_s`, `host_write_mib_per_s`: the same file read and written by a
//!   plain host loop (`pread`/`pwrite` of the same request size into as many buffers of
//!   memory mapped as guest RAM is, one at a time) in the same
//!   run, the median of `ROUNDS`, the baseline; the ratios compare the two (target: at least
//!   0.7);
//! - `blk_notify_to_used_us`: the guest's median, in µs at vCPU 0's `tsc-frequency`.
//!
//! Neither side flushes: both measure the path to the host's page cache, which the file
//! is in (it is written before either pass).

mod common;
use common::{Client, line, start_qomu};

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MIB: u64 = 256;
/// Request sizes, each a run of the guest: 1 MiB (what a Linux guest sends at most by
/// default) and 4 MiB, the headline: under PVM the driver guest's own code is emulated at
/// about 0.5 µs an instruction, so at 1 MiB its per-request work, not the device, bounds
/// the read figure (docs/benchmarks.md).
const REQUESTS_KIB: [u64; 2] = [1024, 4096];
const DEPTH: u32 = 4;
const LATENCY_ROUNDS: u32 = 500;
/// Passes of each kind, guest and host: the figures are their medians (this machine's
/// page cache and CPUs are shared, and one pass varies by a factor of two).
const ROUNDS: usize = 5;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
}

/// The host loop: the whole file in requests of `req` bytes, read then written, going
/// round `DEPTH` buffers as the guest does, in memory made as qomu makes guest RAM (an
/// anonymous mapping of vm-memory's, 128 MiB, the buffers 32 MiB in: where the guest puts
/// them). Heap buffers would differ from guest RAM in page size and caching, not in what
/// the device adds.
fn host_loop(mem: &GuestMemoryMmap, file: &File, total: u64, req: usize) -> (Duration, Duration) {
    let mut bufs: Vec<&mut [u8]> = (0..DEPTH as u64)
        .map(|i| {
            let at = GuestAddress((32 << 20) + i * req as u64);
            let host = mem.get_host_address(at).expect("buffer");
            // SAFETY: `req` bytes from `at` lie in the 128 MiB mapping (DEPTH × req is at
            // most 20 MiB past 32 MiB), which `mem` keeps mapped while the slices live, and
            // the buffers do not overlap.
            unsafe { std::slice::from_raw_parts_mut(host, req) }
        })
        .collect();
    // Touched before the clock starts, as the guest's are after its first pass.
    for buf in &mut bufs {
        buf.fill(0);
    }
    let t = Instant::now();
    for (i, at) in (0..total).step_by(req).enumerate() {
        file.read_exact_at(bufs[i % DEPTH as usize], at)
            .expect("host read");
    }
    let read = t.elapsed();
    for buf in &mut bufs {
        buf.fill(0x5a);
    }
    let t = Instant::now();
    for (i, at) in (0..total).step_by(req).enumerate() {
        file.write_all_at(bufs[i % DEPTH as usize], at)
            .expect("host write");
    }
    (read, t.elapsed())
}

/// What one guest run measured.
struct GuestRun {
    read: Duration,
    write: Duration,
    notify_to_used_us: f64,
    notify_exits: Json,
}

/// Boots the bench guest on `image` with requests of `req_kib` KiB: its median passes and
/// latency.
fn guest_run(dir: &Path, image: &Path, req_kib: u64) -> GuestRun {
    let sock = dir.join("qmp.sock");
    let guest = qomu_guests::path("virtio").display().to_string();
    let server = start_qomu(
        &[
            "-S",
            "-m",
            "128M",
            "--kernel",
            &guest,
            "--append",
            &format!(
                "min=1 bench={MIB} breq={req_kib} depth={DEPTH} rounds={ROUNDS} lat={LATENCY_ROUNDS}"
            ),
            "--device",
            "isa-debug-exit",
            "--device",
            &format!("virtio-blk-pci,id=disk,file={}", image.display()),
            "--serial",
            "none",
        ],
        sock,
    );
    let mut c = Client::handshake(&server.sock);
    c.cmd(r#"{"execute": "__org.qomu_subscribe", "arguments": {"path": "/machine/unattached/serial0", "notifier": "line"}}"#);
    c.cmd(r#"{"execute": "cont"}"#);
    // Asked now: the guest ends (and qomu with it) right after its last line.
    let hz = c.cmd(r#"{"execute": "qom-get", "arguments": {"path": "/machine/unattached/cpu[0]", "property": "tsc-frequency"}}"#)["return"]
        .as_f64()
        .expect("tsc-frequency");
    let mut reads = Vec::new();
    let mut writes = Vec::new();
    for _ in 0..ROUNDS {
        let (_, start) = line(&mut c, "bench: read start");
        let (_, done) = line(&mut c, "bench: read done");
        reads.push(done - start);
        let (_, start) = line(&mut c, "bench: write start");
        let (_, done) = line(&mut c, "bench: write done");
        writes.push(done - start);
    }
    // Read while the guest makes its single reads (it ends right after reporting them).
    let notify_exits = c.cmd(
        r#"{"execute": "qom-get", "arguments": {"path": "disk", "property": "notify-exits"}}"#,
    )["return"]
        .clone();
    let (latency, _) = line(&mut c, "bench: notify-to-used ");
    let ticks: f64 = latency
        .trim_start_matches("bench: notify-to-used ")
        .trim_end_matches(" tsc")
        .parse()
        .expect("a tick count");
    assert!(hz > 0.0, "KVM gave no TSC rate");
    GuestRun {
        read: median(reads),
        write: median(writes),
        notify_to_used_us: ticks / hz * 1e6,
        notify_exits,
    }
}

fn main() {
    let dir = std::env::temp_dir().join(format!("qomu-bench-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let image = dir.join("disk.img");
    let total = MIB << 20;
    let largest = (REQUESTS_KIB[REQUESTS_KIB.len() - 1] << 10) as usize;
    // Real pages in the page cache, not a sparse file's holes: one request more than
    // the passes use, as the guest keeps its requests clear of the last one.
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&image)
        .expect("image");
    let chunk = vec![0xa5u8; largest];
    for at in (0..total + largest as u64).step_by(largest) {
        file.write_all_at(&chunk, at).expect("fill the image");
    }
    for (i, &req_kib) in REQUESTS_KIB.iter().enumerate() {
        let req = (req_kib << 10) as usize;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 128 << 20)])
            .expect("host loop memory");
        let runs: Vec<(Duration, Duration)> = (0..ROUNDS)
            .map(|_| host_loop(&mem, &file, total, req))
            .collect();
        let host_read = mib_per_s(total, median(runs.iter().map(|r| r.0).collect()));
        let host_write = mib_per_s(total, median(runs.iter().map(|r| r.1).collect()));
        let g = guest_run(&dir, &image, req_kib);
        let (read, write) = (mib_per_s(total, g.read), mib_per_s(total, g.write));
        // The headline figures are the largest requests'; the others carry their size.
        let name = |base: &str| {
            if i == REQUESTS_KIB.len() - 1 {
                base.to_owned()
            } else {
                format!("{base}_{req_kib}k")
            }
        };
        let size = format!("({req_kib} KiB requests, {DEPTH} in flight)");
        println!(
            "bench: {} {read:.0} MiB/s {size}",
            name("blk_read_mib_per_s")
        );
        println!(
            "bench: {} {write:.0} MiB/s {size}",
            name("blk_write_mib_per_s")
        );
        println!(
            "bench: {} {host_read:.0} MiB/s",
            name("host_read_mib_per_s")
        );
        println!(
            "bench: {} {host_write:.0} MiB/s",
            name("host_write_mib_per_s")
        );
        println!(
            "ratio: {} {:.2}",
            name("blk_read/host_read"),
            read / host_read
        );
        println!(
            "ratio: {} {:.2}",
            name("blk_write/host_write"),
            write / host_write
        );
        if i == REQUESTS_KIB.len() - 1 {
            println!(
                "bench: blk_notify_to_used_us {:.1} us (median of {LATENCY_ROUNDS} 4 KiB reads)",
                g.notify_to_used_us
            );
            println!(
                "bench: blk_notify_exits {} (notifications that exited to a vCPU)",
                g.notify_exits
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
