//! `scripts/bench snapshot`: how fast a 256 MiB guest is saved to a file and restored.
//!
//! - `save_mib_per_s`: guest RAM MiB over the time from `migrate file:` to the migration's
//!   completion (vCPUs paused, every section written, the file synced to disk).
//! - `restore_mib_per_s`: guest RAM MiB over the time `--incoming` takes in a new machine
//!   (VM created, every section read and checked, state loaded).
//!
//! Baselines, same run and file system: a plain sequential write of the same number of
//! bytes (write, then fsync) and a plain sequential read of the snapshot file into a fresh
//! buffer of its size (as a restore fills fresh guest RAM); the ratios
//! are qomu's rate over the plain one. The guest is the idle test guest; the figures are
//! the median of RUNS.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use machine::{Machine, MachineConfig};

const RAM: u64 = 256 << 20;
const RUNS: usize = 5;

fn config() -> MachineConfig {
    MachineConfig {
        memory: RAM,
        devices: vec!["isa-debug-exit".parse().expect("spec")],
        ..MachineConfig::with_kernel(qomu_guests::path("idle"), "")
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mib_per_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / t.as_secs_f64()
}

fn save(path: &Path) -> Duration {
    let m = Machine::new(&config()).expect("machine");
    m.cont().expect("cont");
    let uri = format!("file:{}", path.display());
    let start = Instant::now();
    m.migrate(&uri).expect("migrate");
    loop {
        let info = m.query_migrate();
        match info
            .as_map()
            .and_then(|i| i.get("status"))
            .and_then(|s| s.as_str())
        {
            Some("completed") => return start.elapsed(),
            Some("failed") => panic!("save failed: {info:?}"),
            _ => std::thread::sleep(Duration::from_micros(200)),
        }
    }
}

fn restore(path: &Path) -> Duration {
    let m = Machine::new(&config()).expect("machine");
    let start = Instant::now();
    m.incoming(&format!("file:{}", path.display()), false)
        .expect("restore");
    start.elapsed()
}

fn plain_write(path: &Path, bytes: u64) -> Duration {
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut f = File::create(path).expect("create");
    for _ in 0..bytes >> 20 {
        f.write_all(&chunk).expect("write");
    }
    f.sync_all().expect("sync");
    start.elapsed()
}

/// Reads the file into a fresh buffer of its size, as a restore must fill fresh RAM.
fn plain_read(path: &Path) -> Duration {
    let start = Instant::now();
    let mut f = File::open(path).expect("open");
    let mut buf = vec![0u8; f.metadata().expect("size").len() as usize];
    f.read_exact(&mut buf).expect("read");
    std::hint::black_box(&buf);
    start.elapsed()
}

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f));
    let dir = std::env::temp_dir().join(format!("qomu-bench-snapshot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (snap, plain) = (dir.join("vm.snap"), dir.join("plain"));
    let (mut saves, mut restores, mut writes, mut reads) = (vec![], vec![], vec![], vec![]);
    for _ in 0..RUNS {
        saves.push(mib_per_s(RAM, save(&snap)));
        writes.push(mib_per_s(RAM, plain_write(&plain, RAM)));
        restores.push(mib_per_s(RAM, restore(&snap)));
        reads.push(mib_per_s(RAM, plain_read(&snap)));
    }
    let (save, write, restore, read) = (
        median(saves),
        median(writes),
        median(restores),
        median(reads),
    );
    if wanted("save") {
        println!("bench: save_mib_per_s {save:.0} MiB/s");
        println!("bench: plain_write_mib_per_s {write:.0} MiB/s");
        println!("ratio: save_vs_plain_write {:.2}", save / write);
    }
    if wanted("restore") {
        println!("bench: restore_mib_per_s {restore:.0} MiB/s");
        println!("bench: plain_read_mib_per_s {read:.0} MiB/s");
        println!("ratio: restore_vs_plain_read {:.2}", restore / read);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
