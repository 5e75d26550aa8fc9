//! `scripts/bench migrate`: live migration between two processes over a unix socket, qomu
//! against QEMU 7.2 (Debian's) in the same run, with the same `downtime-limit` and
//! `max-bandwidth` set on every side.
//!
//! - **idle**: a 1 GiB guest doing nothing (qomu: the `idle` test guest; QEMU: `-M pc
//!   -m 1G -nodefaults`, SeaBIOS finding nothing to boot and halting), migrated while
//!   running, five times each in turn: the medians of `downtime_ms` (`query-migrate`'s,
//!   whole ms), `stop_to_resume_us` (the source's STOP event to the destination's RESUME,
//!   from their timestamps: what the guest sees, measured alike for both), `total_ms`,
//!   `transferred_mib`, `passes`, every run's downtimes, and the ratios qomu/QEMU (target:
//!   downtime at most 20 ms and at most 1/4 of QEMU's);
//! - **writing**: a 1 GiB qomu guest rewriting 4 MiB of RAM at every step of its counter
//!   (the `virtio` guest's `counter` with `dirty=1024`, and its virtio-blk disk), migrated
//!   while it writes: the same figures (QEMU has no guest here that does the same);
//! - **plain copy**: the bytes qomu sent for the idle guest, and the guest's whole RAM,
//!   written through a unix socket pair by one thread and read by another in this process:
//!   `plain_copy_ms` and `plain_copy_ram_ms`; the ratio of qomu's total time to the copy of
//!   the RAM (target: at most 1.5).

mod common;
use common::{Client, start, start_qomu, timestamp};

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

const RAM: u64 = 1 << 30;
/// Both sides' `max-bandwidth`: high enough not to bound a copy on this machine (QEMU's
/// default, 128 MiB/s, would bound both to 8 s a GiB).
const BANDWIDTH: u64 = 32 << 30;
const DOWNTIME_LIMIT_MS: u64 = 300;

/// What one migration reported when it completed.
#[derive(Debug)]
struct Figures {
    downtime_ms: f64,
    /// The source's STOP to the destination's RESUME, from the two events' timestamps
    /// (both processes read the same host clock): what the guest sees, measured the same
    /// way for both VMMs, to the microsecond.
    stop_to_resume_us: f64,
    total_ms: f64,
    transferred: u64,
    passes: u64,
}

fn set_parameters(c: &mut Client) {
    let r = c.cmd(&format!(
        r#"{{"execute": "migrate-set-parameters", "arguments": {{"downtime-limit": {DOWNTIME_LIMIT_MS}, "max-bandwidth": {BANDWIDTH}}}}}"#
    ));
    assert_eq!(
        r,
        serde_json::json!({"return": {}}),
        "migrate-set-parameters"
    );
}

/// When `c`'s server emitted event `name` (its last one, waiting up to the client's read
/// timeout for the first).
fn event_time(c: &mut Client, name: &str) -> Duration {
    loop {
        if let Some(e) = c.events.iter().rev().find(|e| e["event"] == name) {
            return timestamp(e);
        }
        c.pump();
    }
}

/// Runs `migrate` to `uri` on `source` and waits for its end and `dest`'s RESUME.
fn migrate(source: &mut Client, dest: &mut Client, uri: &str) -> Figures {
    let r = source
        .cmd(&serde_json::json!({"execute": "migrate", "arguments": {"uri": uri}}).to_string());
    assert_eq!(r, serde_json::json!({"return": {}}), "migrate");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let info = source.cmd(r#"{"execute": "query-migrate"}"#)["return"].clone();
        match info["status"].as_str() {
            Some("completed") => {
                let n = |v: &Json| v.as_f64().unwrap_or(0.0);
                let stop = event_time(source, "STOP");
                let resume = event_time(dest, "RESUME");
                return Figures {
                    downtime_ms: n(&info["downtime"]),
                    stop_to_resume_us: resume.saturating_sub(stop).as_secs_f64() * 1e6,
                    total_ms: n(&info["total-time"]),
                    transferred: info["ram"]["transferred"].as_u64().unwrap_or(0),
                    passes: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
                };
            }
            Some("failed" | "cancelled") => panic!("the migration failed: {info}"),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the migration never ended: {info}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// qomu to qomu: `args` on both, the destination waiting at a unix socket.
fn qomu_pair(dir: &Path, args: &[&str], settle: Duration) -> Figures {
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut dest_args = args.to_vec();
    dest_args.extend(["--incoming", &uri]);
    let dest = start_qomu(&dest_args, dir.join("dst.qmp"));
    let source = start_qomu(args, dir.join("src.qmp"));
    let mut d = Client::handshake(&dest.sock);
    let mut s = Client::handshake(&source.sock);
    set_parameters(&mut d);
    set_parameters(&mut s);
    std::thread::sleep(settle);
    let f = migrate(&mut s, &mut d, &uri);
    drop((s, d, source, dest));
    f
}

/// QEMU to QEMU: a 1 GiB `-M pc` guest with nothing to boot.
fn qemu_pair(dir: &Path) -> Figures {
    let qemu = "qemu-system-x86_64";
    let base = |qmp: &Path| -> Vec<String> {
        [
            "-M",
            "pc",
            "-m",
            "1G",
            "-nodefaults",
            "-display",
            "none",
            "-accel",
            "kvm",
            "-accel",
            "tcg",
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp.display()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let uri = format!("unix:{}", dir.join("qemu-mig.sock").display());
    let mut dest_args = base(&dir.join("qdst.qmp"));
    dest_args.extend(["-incoming".into(), uri.clone()]);
    let dest = start(qemu, &dest_args, dir.join("qdst.qmp"));
    let source = start(qemu, &base(&dir.join("qsrc.qmp")), dir.join("qsrc.qmp"));
    let mut d = Client::handshake(&dest.sock);
    let mut s = Client::handshake(&source.sock);
    set_parameters(&mut d);
    set_parameters(&mut s);
    std::thread::sleep(Duration::from_secs(1));
    let f = migrate(&mut s, &mut d, &uri);
    drop((s, d, source, dest));
    f
}

/// `bytes` through a unix socket pair, 1 MiB at a time: the time from the first write to
/// the last read.
fn plain_copy(bytes: u64) -> Duration {
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    let t = Instant::now();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0x5au8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            a.write_all(&chunk[..n]).expect("write");
            left -= n as u64;
        }
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    while got < bytes {
        got += b.read(&mut buf).expect("read") as u64;
    }
    writer.join().unwrap();
    t.elapsed()
}

fn print(name: &str, f: &Figures) {
    println!("bench: {name}_downtime_ms {:.0} ms", f.downtime_ms);
    println!(
        "bench: {name}_stop_to_resume_us {:.0} us (source's STOP to destination's RESUME)",
        f.stop_to_resume_us
    );
    println!("bench: {name}_total_ms {:.0} ms", f.total_ms);
    println!(
        "bench: {name}_transferred_mib {:.1} MiB",
        f.transferred as f64 / (1 << 20) as f64
    );
    println!("bench: {name}_passes {}", f.passes);
}

/// Idle migrations per VMM in one run; their medians are compared.
const IDLE_RUNS: usize = 5;

/// Each figure's median over `runs` (figure by figure).
fn median(runs: &[Figures]) -> Figures {
    let mid = |f: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Figures {
        downtime_ms: mid(|f| f.downtime_ms),
        stop_to_resume_us: mid(|f| f.stop_to_resume_us),
        total_ms: mid(|f| f.total_ms),
        transferred: mid(|f| f.transferred as f64) as u64,
        passes: mid(|f| f.passes as f64) as u64,
    }
}

/// The downtime figures of every run, for the spread around the median.
fn spread(name: &str, runs: &[Figures]) {
    let list = |f: fn(&Figures) -> f64| {
        runs.iter()
            .map(|r| format!("{:.0}", f(r)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "bench: {name}_runs {} (the figures above are medians; downtime_ms: {}; stop_to_resume_us: {})",
        runs.len(),
        list(|f| f.downtime_ms),
        list(|f| f.stop_to_resume_us)
    );
}

fn main() {
    let dir = std::env::temp_dir().join(format!("qomu-bench-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let idle_guest = qomu_guests::path("idle").display().to_string();
    // The idle pairs in turn, qomu's then QEMU's, so that what else this machine does
    // weighs on both alike.
    let (mut qomu_runs, mut qemu_runs) = (Vec::new(), Vec::new());
    for _ in 0..IDLE_RUNS {
        qomu_runs.push(qomu_pair(
            &dir,
            &["-m", "1G", "--kernel", &idle_guest, "--serial", "none"],
            Duration::from_secs(1),
        ));
        qemu_runs.push(qemu_pair(&dir));
    }
    let qomu_idle = median(&qomu_runs);
    let qemu_idle = median(&qemu_runs);
    print("qomu_idle", &qomu_idle);
    spread("qomu_idle", &qomu_runs);

    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let virtio = qomu_guests::path("virtio").display().to_string();
    let blk = format!("virtio-blk-pci,id=disk,file={}", disk.display());
    let qomu_writing = qomu_pair(
        &dir,
        &[
            "-m",
            "1G",
            "--kernel",
            &virtio,
            "--append",
            "counter=100000000 spin=0 dirty=1024",
            "--device",
            &blk,
            "--serial",
            "none",
        ],
        Duration::from_secs(2),
    );
    print("qomu_writing", &qomu_writing);

    print("qemu_idle", &qemu_idle);
    spread("qemu_idle", &qemu_runs);
    println!(
        "ratio: qomu_idle_downtime/qemu_idle_downtime {:.2}",
        qomu_idle.downtime_ms / qemu_idle.downtime_ms.max(1.0)
    );
    println!(
        "ratio: qomu_idle_stop_to_resume/qemu_idle_stop_to_resume {:.3}",
        qomu_idle.stop_to_resume_us / qemu_idle.stop_to_resume_us.max(1.0)
    );
    println!(
        "ratio: qomu_idle_total/qemu_idle_total {:.2}",
        qomu_idle.total_ms / qemu_idle.total_ms.max(1.0)
    );

    let copy = plain_copy(qomu_idle.transferred);
    let copy_ram = plain_copy(RAM);
    println!(
        "bench: plain_copy_ms {:.1} ms ({:.1} MiB, what qomu sent for the idle guest)",
        copy.as_secs_f64() * 1000.0,
        qomu_idle.transferred as f64 / (1 << 20) as f64
    );
    println!(
        "bench: plain_copy_ram_ms {:.0} ms (1 GiB, the guest's RAM)",
        copy_ram.as_secs_f64() * 1000.0
    );
    println!(
        "ratio: qomu_idle_total/plain_copy_ram {:.2}",
        qomu_idle.total_ms / (copy_ram.as_secs_f64() * 1000.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
