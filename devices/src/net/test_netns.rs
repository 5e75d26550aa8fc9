//! For tests: a network namespace the test makes and deletes, into which a tap goes with a
//! host address. Test traffic goes only there (../shared/notes/net.md, "Rule for network
//! tests"): nothing in it routes anywhere else, and every wait is bounded.

use std::io::IoSliceMut;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::tap::{Tap, VNET_HDR_LEN};

/// Longest any wait for a frame takes.
const PATIENCE: Duration = Duration::from_secs(5);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Whether `program` can be run; where not, says why, and under CI that is a failure.
pub fn have_program(program: &str, package: &str) -> bool {
    if Command::new(program).arg("--version").output().is_ok() {
        return true;
    }
    let why = format!("no `{program}` (Debian's {package}; scripts/test installs it)");
    if std::env::var_os("CI").is_some() {
        panic!("{why} (a failure under CI)");
    }
    eprintln!("skipped: {why}");
    false
}

/// Whether this process may make taps and namespaces (root, /dev/net/tun, `ip`). Where it
/// may not, says why; under CI (`CI` set) that is a failure, not a skip.
pub fn can_make_taps() -> bool {
    // SAFETY: geteuid has no preconditions.
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("not root")
    } else if !std::path::Path::new("/dev/net/tun").exists() {
        Some("no /dev/net/tun")
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("no `ip` (iproute2)")
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if std::env::var_os("CI").is_some() => {
            panic!("cannot make taps in a test namespace: {why} (a failure under CI)")
        }
        Some(why) => {
            eprintln!("skipped: cannot make taps in a test namespace: {why}");
            false
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace of this test's own, deleted when dropped.
pub struct Netns {
    pub name: String,
    n: u32,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("qomu-{tag}-{}-{n}", std::process::id());
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name, n }
    }

    /// A tap name no other test of this process uses (at most 15 bytes).
    pub fn tap_name(&self) -> String {
        format!("qt{}x{}", std::process::id() % 100_000, self.n)
    }

    /// A veth pair with both ends inside the namespace: `va` with `addr` (CIDR) and a
    /// default route via `gateway`, `vb` up. What leaves `va` arrives at `vb`: the
    /// namespace has a routable interface (passt wants one) that reaches nothing outside.
    pub fn routed_veth(&self, addr: &str, gateway: &str) {
        ip(&[
            "-n", &self.name, "link", "add", "va", "type", "veth", "peer", "name", "vb",
        ]);
        ip(&["-n", &self.name, "addr", "add", addr, "dev", "va"]);
        ip(&["-n", &self.name, "link", "set", "va", "up"]);
        ip(&["-n", &self.name, "link", "set", "vb", "up"]);
        ip(&["-n", &self.name, "route", "add", "default", "via", gateway]);
    }

    /// Runs `program ARGS` inside the namespace.
    pub fn spawn(&self, program: &str, args: &[&str]) -> std::process::Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run in the namespace")
    }

    /// Moves the tap `ifname` into the namespace, gives it `addr` (CIDR) and brings it up.
    pub fn take_tap(&self, ifname: &str, addr: &str) {
        ip(&["link", "set", ifname, "netns", &self.name]);
        ip(&["-n", &self.name, "addr", "add", addr, "dev", ifname]);
        ip(&["-n", &self.name, "link", "set", ifname, "up"]);
    }

    /// The first frame from the tap (its vnet header removed) that `wanted` accepts; others
    /// (the kernel's own IPv6 chatter) are skipped. Panics after a bounded wait.
    pub fn wait_frame(&self, tap: &Tap, wanted: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let end = Instant::now() + PATIENCE;
        let mut header = [0u8; VNET_HDR_LEN];
        let mut frame = vec![0u8; 65536];
        while Instant::now() < end {
            let mut bufs = [IoSliceMut::new(&mut header), IoSliceMut::new(&mut frame)];
            match tap.read_frame(&mut bufs) {
                Ok(n) if n > VNET_HDR_LEN && wanted(&frame[..n - VNET_HDR_LEN]) => {
                    return frame[..n - VNET_HDR_LEN].to_vec();
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("read the tap: {e}"),
            }
        }
        panic!("no wanted frame from the tap within {PATIENCE:?}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// An Ethernet ARP request from `mac`/`sender` for `target`, broadcast.
pub fn arp_request(mac: [u8; 6], sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]); // Ethernet, IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&sender);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}
