//! `scripts/bench net`: virtio-net through a tap, seen from the driver guest, next to a
//! plain host loop doing the same tap writes and reads in the same run.
//!
//! Root is needed (a network namespace and taps). The bench makes a namespace of its own
//! (`qomu-bench-net-PID`), moves qomu's tap there with 10.0.2.2/24, and sends nothing
//! anywhere else. The `virtio` driver guest in its `netbench` mode (tests/guests/c/virtio.c),
//! after its ARP, ping and UDP exchange:
//!
//! - **guest to host**: sends `FRAMES` frames of 1514 bytes to a MAC nobody has (the
//!   namespace's kernel drops them on arrival), its transmit ring's 256 in flight, the
//!   slots the device returned offered again in one batch (as Linux offers a backlog under
//!   load), and reports the time stamp counter ticks from the first to the last:
//!   `net_tx_frames_per_s`, `net_tx_mib_per_s`, and the frames per notification the
//!   device got, `net_tx_frames_per_kick`; then a quarter as many with 8 in flight, the
//!   same figures as `net_tx8_*` (each wake-up of the device's thread then brings it at
//!   most 8 frames);
//! - **host to guest**: the bench sends frames to the guest's MAC from a packet socket on
//!   the tap's end in the namespace, as fast as it can for `RX_SECONDS`; the guest counts
//!   what arrives and the ticks from the first to the last: `net_rx_frames_per_s`,
//!   `net_rx_mib_per_s` (frames the tap's queue dropped because the guest was slower do not
//!   count; `net_rx_received` says how many came);
//! - the CPU time (the scheduler's count, /proc's `schedstat`) qomu's I/O thread `io-nic0`
//!   spent during each pass, per frame: `net_tx_cpu_us_per_frame`,
//!   `net_tx8_cpu_us_per_frame`, `net_rx_cpu_us_per_frame`;
//! - **baseline**: a plain loop on a tap of the bench's own, in the same run, writing the
//!   same frames (with the same 12-byte vnet header), then reading the same number sent
//!   to it from a packet socket, timed with its own thread's CPU clock:
//!   `host_tx_cpu_us_per_frame`, `host_rx_cpu_us_per_frame`, and the ratios (target: at
//!   most 2 with the full ring; the 8-deep ratio is for comparison);
//! - `net_rtt_us`: the median of 101 pings of 10.0.2.2 from the guest, from its notify
//!   write to the reply seen, at vCPU 0's `tsc-frequency`.

mod common;
use common::{Client, line, start_qomu};

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

const FRAMES: u64 = 200_000;
const FRAME: usize = 1514;
const VNET_HDR: usize = 12;

fn ip(args: &[&str]) {
    let ok = Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ip {}", args.join(" "));
}

/// The bench's namespace, deleted when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Opens (creating) tap `name` with vnet headers, as qomu opens its taps.
fn open_tap(name: &str) -> File {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let file = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF and TUNSETVNETHDRSZ on an open tun file, with an ifreq-shaped
    // struct and an int.
    unsafe {
        assert_eq!(
            libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req),
            0,
            "TUNSETIFF"
        );
        let size: libc::c_int = VNET_HDR as libc::c_int;
        assert_eq!(
            libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size),
            0,
            "TUNSETVNETHDRSZ"
        );
    }
    file
}

/// A raw packet socket bound to interface `name` of the calling thread's namespace.
fn packet_socket(name: &str) -> OwnedFd {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: plain socket calls on a descriptor this function owns; the sockaddr_ll is
    // zeroed and filled field by field.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        );
        assert!(fd >= 0, "AF_PACKET socket");
        let fd = OwnedFd::from_raw_fd(fd);
        let index = libc::if_nametoindex(cname.as_ptr());
        assert!(index > 0, "no interface {name}");
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = index as i32;
        let r = libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(r, 0, "bind to {name}");
        fd
    }
}

/// A benchmark frame to `dest`: ethertype 0x88b5, its first payload byte `mark`.
fn frame(dest: [u8; 6], mark: u8) -> Vec<u8> {
    let mut f = dest.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x88, 0xb5]);
    f.resize(FRAME, 0x5a);
    f[14] = mark;
    f
}

/// How long the host sends to the guest: long enough for the CPU figures (/proc counts
/// in 10 ms ticks) whatever share of the frames the guest keeps up with.
const RX_SECONDS: u64 = 3;

/// Sends `n` frames to `dest`, or as many as fit in `RX_SECONDS` if `n` is 0, and then a
/// few end marks, from a packet socket on `ifname`, in namespace `ns` (None: this one), on
/// a thread of its own.
fn send_frames(
    ns: Option<String>,
    ifname: String,
    dest: [u8; 6],
    n: u64,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            let f = File::open(format!("/var/run/netns/{ns}")).expect("the namespace");
            // SAFETY: setns on an open namespace file moves only this thread.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        }
        let socket = packet_socket(&ifname);
        let (data, end) = (frame(dest, 0), frame(dest, 0xff));
        let send = |f: &[u8]| {
            // SAFETY: a send of a live buffer on a socket this thread owns.
            unsafe { libc::send(socket.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) }
        };
        let end_at = Instant::now() + Duration::from_secs(RX_SECONDS);
        let mut sent = 0;
        while if n == 0 {
            Instant::now() < end_at
        } else {
            sent < n
        } {
            while send(&data) < 0 {
                std::thread::yield_now();
            }
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
        for _ in 0..5 {
            send(&end);
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// The plain host loop: `FRAMES` frames (vnet header and frame) written to a tap of its
/// own, then as many read from it as a packet socket sends; CPU µs per frame each way.
fn host_loop() -> (f64, f64) {
    let name = format!("qbh{}", std::process::id() % 100_000);
    let mut tap = open_tap(&name);
    ip(&["link", "set", &name, "up"]);
    let mut buf = vec![0u8; VNET_HDR];
    buf.extend_from_slice(&frame([0x02, 0, 0, 0, 0, 0x01], 0));
    let t = thread_cpu();
    for _ in 0..FRAMES {
        tap.write_all(&buf).expect("tap write");
    }
    let tx = (thread_cpu() - t).as_secs_f64() * 1e6 / FRAMES as f64;
    // The tap's MAC, for frames the kernel hands to it.
    let mac_text = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).unwrap();
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(mac_text.trim().split(':')) {
        *b = u8::from_str_radix(part, 16).unwrap();
    }
    let sender = send_frames(None, name.clone(), mac, FRAMES);
    let mut read = vec![0u8; 65536];
    let (mut n, mut cpu) = (0u64, Duration::ZERO);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let t = thread_cpu();
        let got = tap.read(&mut read).expect("tap read");
        cpu += thread_cpu() - t;
        if got > VNET_HDR + 14 && read[VNET_HDR + 12..VNET_HDR + 14] == [0x88, 0xb5] {
            if read[VNET_HDR + 14] == 0xff {
                break;
            }
            n += 1;
        }
    }
    sender.join().unwrap();
    let rx = cpu.as_secs_f64() * 1e6 / n.max(1) as f64;
    (tx, rx)
}

/// The CPU time of qomu's thread `name`: the scheduler's own count, in nanoseconds
/// (`schedstat`; /proc's `stat` counts in 10 ms ticks, coarse for a pass of a few hundred ms).
fn thread_cpu_of(pid: u32, name: &str) -> Duration {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let task = task.unwrap().path();
        if std::fs::read_to_string(task.join("comm")).is_ok_and(|c| c.trim() == name) {
            let stat = std::fs::read_to_string(task.join("schedstat")).unwrap();
            let ns: u64 = stat.split_whitespace().next().unwrap().parse().unwrap();
            return Duration::from_nanos(ns);
        }
    }
    panic!("qomu has no thread {name}")
}

/// The kicks the NIC's queues have had.
fn notifications(c: &mut Client) -> u64 {
    c.cmd(r#"{"execute": "qom-get", "arguments": {"path": "/machine/peripheral/nic0", "property": "notifications"}}"#)["return"]
        .as_u64()
        .expect("notifications")
}

/// The guest's transmit pass `name`, from its start line to its done line: the I/O
/// thread's CPU, the notifications, the frames sent and the seconds they took.
fn tx_pass(c: &mut Client, pid: u32, name: &str, hz: f64) -> (Duration, u64, u64, f64) {
    line(c, &format!("netbench: {name} start"));
    let cpu = thread_cpu_of(pid, "io-nic0");
    let kicks = notifications(c);
    let (l, _) = line(c, &format!("netbench: {name} done"));
    let cpu = thread_cpu_of(pid, "io-nic0") - cpu;
    let kicks = notifications(c) - kicks;
    let (sent, ticks) = ticks_of(&l);
    (cpu, kicks, sent, ticks as f64 / hz)
}

fn ticks_of(l: &str) -> (u64, u64) {
    // "netbench: tx done N frames in T tsc"
    let words: Vec<&str> = l.split_whitespace().collect();
    (words[3].parse().unwrap(), words[6].parse().unwrap())
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("scripts/bench net needs root: a network namespace and taps");
        std::process::exit(2);
    }
    let (host_tx, host_rx) = host_loop();

    let ns = Netns(format!("qomu-bench-net-{}", std::process::id()));
    ip(&["netns", "add", &ns.0]);
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
    let tap = format!("qbn{}", std::process::id() % 100_000);
    let dir = std::env::temp_dir().join(format!("qomu-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let guest = qomu_guests::path("virtio").display().to_string();
    let server = start_qomu(
        &[
            "-S",
            "--kernel",
            &guest,
            "--append",
            &format!("netbench={FRAMES}"),
            "--device",
            "isa-debug-exit",
            "--netdev",
            &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            "--device",
            "virtio-net-pci,id=nic0,netdev=n0",
            "--serial",
            "none",
        ],
        dir.join("qmp.sock"),
    );
    ip(&["link", "set", &tap, "netns", &ns.0]);
    ip(&["-n", &ns.0, "addr", "add", "10.0.2.2/24", "dev", &tap]);
    ip(&["-n", &ns.0, "link", "set", &tap, "up"]);
    let pid = server.child.id();
    let mut c = Client::handshake(&server.sock);
    c.cmd(r#"{"execute": "__org.qomu_subscribe", "arguments": {"path": "/machine/unattached/serial0", "notifier": "line"}}"#);
    c.cmd(r#"{"execute": "cont"}"#);
    let hz = c.cmd(r#"{"execute": "qom-get", "arguments": {"path": "/machine/unattached/cpu[0]", "property": "tsc-frequency"}}"#)["return"]
        .as_f64()
        .expect("tsc-frequency");

    let (tx_cpu, tx_kicks, sent, tx_s) = tx_pass(&mut c, pid, "tx", hz);
    let (tx8_cpu, tx8_kicks, sent8, tx8_s) = tx_pass(&mut c, pid, "tx8", hz);

    line(&mut c, "netbench: rx ready");
    let cpu = thread_cpu_of(pid, "io-nic0");
    let sender = send_frames(
        Some(ns.0.clone()),
        tap.clone(),
        [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        0,
    );
    let (l, _) = line(&mut c, "netbench: rx done");
    let rx_cpu = thread_cpu_of(pid, "io-nic0") - cpu;
    sender.join().unwrap();
    let (received, ticks) = ticks_of(&l);
    let rx_s = ticks as f64 / hz;
    let (l, _) = line(&mut c, "netbench: rtt ");
    let rtt_ticks: f64 = l.split_whitespace().nth(2).unwrap().parse().unwrap();

    let mib = |frames: u64, s: f64| frames as f64 * FRAME as f64 / (1 << 20) as f64 / s;
    let per_frame = |cpu: Duration, frames: u64| cpu.as_secs_f64() * 1e6 / frames.max(1) as f64;
    let (tx_per, rx_per) = (per_frame(tx_cpu, sent), per_frame(rx_cpu, received));
    let tx8_per = per_frame(tx8_cpu, sent8);
    println!(
        "bench: net_tx_frames_per_s {:.0} frames/s ({sent} frames of {FRAME} bytes, the ring's 256 in flight)",
        sent as f64 / tx_s
    );
    println!("bench: net_tx_mib_per_s {:.1} MiB/s", mib(sent, tx_s));
    println!(
        "bench: net_tx_frames_per_kick {:.2} frames (the guest's notifications while it sent)",
        sent as f64 / tx_kicks.max(1) as f64
    );
    println!(
        "bench: net_tx8_frames_per_s {:.0} frames/s ({sent8} frames, 8 in flight)",
        sent8 as f64 / tx8_s
    );
    println!(
        "bench: net_tx8_frames_per_kick {:.2} frames",
        sent8 as f64 / tx8_kicks.max(1) as f64
    );
    println!(
        "bench: net_rx_frames_per_s {:.0} frames/s",
        received as f64 / rx_s.max(1e-9)
    );
    println!(
        "bench: net_rx_mib_per_s {:.1} MiB/s",
        mib(received, rx_s.max(1e-9))
    );
    println!(
        "bench: net_rx_received {received} frames (the host sent for {RX_SECONDS} s as fast as it could)"
    );
    println!("bench: net_tx_cpu_us_per_frame {tx_per:.2} us (qomu's io-nic0)");
    println!("bench: net_tx8_cpu_us_per_frame {tx8_per:.2} us (qomu's io-nic0, 8 in flight)");
    println!("bench: net_rx_cpu_us_per_frame {rx_per:.2} us (qomu's io-nic0)");
    println!("bench: host_tx_cpu_us_per_frame {host_tx:.2} us (a plain loop's tap writes)");
    println!("bench: host_rx_cpu_us_per_frame {host_rx:.2} us (a plain loop's tap reads)");
    println!("ratio: net_tx_cpu/host_tx_cpu {:.2}", tx_per / host_tx);
    println!("ratio: net_tx8_cpu/host_tx_cpu {:.2}", tx8_per / host_tx);
    println!("ratio: net_rx_cpu/host_rx_cpu {:.2}", rx_per / host_rx);
    println!(
        "bench: net_rtt_us {:.1} us (median of 101 pings from the guest)",
        rtt_ticks / hz * 1e6
    );
    drop(c);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
