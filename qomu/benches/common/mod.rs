//! What the QMP benchmarks share: a raw-socket QMP client that keeps replies and events
//! apart, and a server process killed on drop.
#![allow(dead_code)] // each bench uses its own part

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

pub const QOMU: &str = env!("CARGO_BIN_EXE_qomu");

pub struct Client {
    pub stream: UnixStream,
    buf: Vec<u8>,
    /// Messages read while waiting for something else: QEMU may send an event before the
    /// reply to the command that caused it, and qomu either way round.
    pub replies: std::collections::VecDeque<Json>,
    pub events: std::collections::VecDeque<Json>,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Client {
            stream,
            buf: Vec::new(),
            replies: Default::default(),
            events: Default::default(),
        }
    }

    pub fn line(&mut self) -> Json {
        let line = self.raw_line();
        serde_json::from_slice(&line).expect("JSON")
    }

    /// The next line as it came, without its CRLF.
    fn raw_line(&mut self) -> Vec<u8> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return self.buf.drain(..i + 2).take(i).collect();
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "server closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends `text` and returns the reply's text, checked to be a success but not parsed:
    /// for the timed loops, whose figures are the servers' round trip, not this client's
    /// JSON decoding (which grows with the reply: 1.6 KB for qomu's `qom-list /machine`,
    /// 1.1 KB for QEMU's). Events that come first are parsed and queued as ever.
    pub fn cmd_raw(&mut self, text: &str) -> Vec<u8> {
        self.stream.write_all(text.as_bytes()).expect("write");
        loop {
            let line = self.raw_line();
            if line.starts_with(b"{\"event\"") {
                self.events
                    .push_back(serde_json::from_slice(&line).expect("JSON"));
                continue;
            }
            assert!(
                line.starts_with(b"{\"return\": "),
                "{}",
                String::from_utf8_lossy(&line)
            );
            return line;
        }
    }

    /// Reads one message into its queue.
    pub fn pump(&mut self) {
        let m = self.line();
        if m.get("event").is_some() {
            self.events.push_back(m);
        } else {
            self.replies.push_back(m);
        }
    }

    pub fn cmd(&mut self, text: &str) -> Json {
        self.stream.write_all(text.as_bytes()).expect("write");
        self.reply()
    }

    pub fn reply(&mut self) -> Json {
        loop {
            if let Some(r) = self.replies.pop_front() {
                return r;
            }
            self.pump();
        }
    }

    /// Waits for event `name`; earlier events of other names are dropped.
    pub fn wait_event(&mut self, name: &str) {
        loop {
            while let Some(e) = self.events.pop_front() {
                if e["event"] == name {
                    return;
                }
            }
            self.pump();
        }
    }

    pub fn handshake(path: &Path) -> Client {
        let mut c = Client::connect(path);
        c.line();
        c.cmd(r#"{"execute": "qmp_capabilities"}"#);
        c
    }
}

pub struct Server {
    pub child: Child,
    pub sock: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

pub fn start(program: &str, args: &[String], sock: PathBuf) -> Server {
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "{program} did not open its QMP socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Server { child, sock }
}

/// Starts `qomu ARGS --dbus none --qmp unix:SOCK` and waits for its socket.
pub fn start_qomu(args: &[&str], sock: PathBuf) -> Server {
    let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    args.extend(["--dbus".into(), "none".into(), "--qmp".into()]);
    args.push(format!("unix:{}", sock.display()));
    start(QOMU, &args, sock)
}

pub fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6
}

/// The serial console's lines, subscribed to as `line` notifications.
pub fn timestamp(e: &Json) -> Duration {
    let t = &e["timestamp"];
    Duration::from_secs(t["seconds"].as_u64().expect("seconds"))
        + Duration::from_micros(t["microseconds"].as_u64().expect("microseconds"))
}

/// The next console line and when qomu saw it.
pub fn next_line(c: &mut Client) -> (String, Duration) {
    loop {
        while let Some(e) = c.events.pop_front() {
            if e["event"] == "__org.qomu_NOTIFY" && e["data"]["notifier"] == "line" {
                let line = e["data"]["data"]["line"].as_str().unwrap_or("").to_owned();
                return (line, timestamp(&e));
            }
        }
        c.pump();
    }
}

/// Waits for the console line starting with `prefix`; the line and its time stamp.
pub fn line(c: &mut Client, prefix: &str) -> (String, Duration) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (l, at) = next_line(c);
        assert!(!l.contains("failed at step"), "the bench guest failed: {l}");
        if l.starts_with(prefix) {
            return (l, at);
        }
        assert!(Instant::now() < deadline, "no '{prefix}' line");
    }
}
