//! A private D-Bus daemon for `--dbus auto` on a machine with no session bus (a server, a
//! CI runner, an SSH login without a desktop): qomu starts `dbus-daemon` on a socket of its
//! own, serves the tree there, prints the address, and stops the daemon when it ends.
//!
//! Part of the `qomu` binary, not of the machine library.

use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A running `dbus-daemon`, stopped on drop.
pub struct PrivateBus {
    child: Child,
    dir: PathBuf,
    address: String,
}

impl PrivateBus {
    /// Starts `dbus-daemon --session` listening on a socket in a new 0700 directory under
    /// `$XDG_RUNTIME_DIR` (or the temp directory).
    ///
    /// # Errors
    /// `dbus-daemon` is not installed or does not start.
    pub fn start() -> io::Result<PrivateBus> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("qomu-dbus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        // The daemon's complaints (it cannot raise its fd limit when not root...) are noise
        // unless it fails to start.
        let log_path = dir.join("dbus-daemon.log");
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new("dbus-daemon");
        cmd.args(["--session", "--nofork", "--nopidfile", "--print-address=1"])
            .arg(format!("--address=unix:path={}/bus", dir.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // sigemptyset(3), sigprocmask(2) and prctl(2), which are async-signal-safe, on a
        // local signal set. It unblocks the signals qomu blocks for its signal thread (the
        // mask is inherited across exec, and a blocked SIGTERM would never stop the daemon),
        // then has the kernel stop the daemon if qomu dies without running its destructors
        // (SIGKILL).
        unsafe {
            cmd.pre_exec(|| {
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) == -1
                    || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|out| BufReader::new(out).read_line(&mut line));
        let address = line.trim().to_owned();
        if !matches!(read, Some(Ok(n)) if n > 0) || address.is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            let said = std::fs::read_to_string(&log_path).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            return Err(io::Error::other(format!(
                "dbus-daemon printed no address: {}",
                said.trim()
            )));
        }
        Ok(PrivateBus {
            child,
            dir,
            address,
        })
    }

    /// The bus's D-Bus address (`unix:path=...,guid=...`).
    pub fn address(&self) -> &str {
        &self.address
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
