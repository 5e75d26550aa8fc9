//! Where a migration goes or comes from: QEMU's URIs (`file:PATH`, `unix:PATH`,
//! `tcp:HOST:PORT`, `exec:CMD`, `fd:NAME`), and the streams they open.
//!
//! Written over std's sockets and `sh -c` rather than a crate: each transport is a few lines
//! of connecting, listening or spawning, and the stream on top is the snapshot's own.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::error::{Error, Result};

/// A migration URI, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    File(PathBuf),
    Unix(PathBuf),
    Tcp {
        host: String,
        port: u16,
    },
    Exec(String),
    /// A descriptor handed over: over QMP, `getfd`'s name, which the front end turns into
    /// a handover token (qom::handover).
    Fd(String),
}

impl Uri {
    /// Parses a URI as QEMU's `migrate` and `-incoming` take them, and refuses one the
    /// sandbox forbids: `exec:` starts a program, which would run under the filter of the
    /// thread that started it (QEMU's `-sandbox spawn=deny`, which libvirt sets, refuses
    /// it too).
    ///
    /// # Errors
    /// An unknown scheme, or one without what it needs (QEMU's words).
    pub fn parse(uri: &str) -> Result<Uri> {
        let bad = || Error::BadUri {
            uri: uri.to_owned(),
        };
        let (scheme, rest) = uri.split_once(':').ok_or_else(bad)?;
        Ok(match scheme {
            "file" if !rest.is_empty() => Uri::File(PathBuf::from(rest)),
            "file" => return Err(Error::NoPath),
            "unix" if !rest.is_empty() => Uri::Unix(PathBuf::from(rest)),
            "tcp" => {
                // tcp:HOST:PORT, HOST possibly [v6] or empty (every address).
                let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
                let port = port.parse().map_err(|_| bad())?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                Uri::Tcp {
                    host: host.to_owned(),
                    port,
                }
            }
            "exec" if sandbox::active() => return Err(Error::SpawnForbidden),
            "exec" => Uri::Exec(rest.to_owned()),
            "fd" if !rest.is_empty() => Uri::Fd(rest.to_owned()),
            _ => return Err(bad()),
        })
    }

    fn tcp_addr(host: &str, port: u16) -> String {
        let host = if host.is_empty() { "0.0.0.0" } else { host };
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }
}

impl std::fmt::Display for Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Uri::File(p) => write!(f, "file:{}", p.display()),
            Uri::Unix(p) => write!(f, "unix:{}", p.display()),
            Uri::Tcp { host, port } => write!(f, "tcp:{}", Uri::tcp_addr(host, *port)),
            Uri::Exec(cmd) => write!(f, "exec:{cmd}"),
            // A handover token is nobody's business: the descriptor, by what it is.
            Uri::Fd(_) => write!(f, "fd:(a descriptor handed over)"),
        }
    }
}

/// What a destination sends back on a two-way stream (unix, tcp) once it has loaded
/// everything, before its guest runs: until it comes, the source keeps its VM.
pub const LOADED: &[u8; 8] = b"QOMUDONE";
/// What a destination sends back on a two-way stream when it has loaded a pass's pages
/// (a `pass-end:N` section): the source stops its guest only once the destination has
/// caught up, so no page of an earlier pass is still being loaded in the downtime.
pub const PASS_LOADED: &[u8; 8] = b"QOMUPASS";
/// How long a source waits for [`LOADED`] after its last byte: a destination that hangs
/// instead of dying must not hold the source's VM stopped for ever.
pub const LOADED_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Where a source writes: the stream, the way back for the destination's [`LOADED`] (a
/// socket's other direction), and a child to wait for (`exec:`).
pub struct Outgoing {
    pub stream: Box<dyn Write + Send>,
    pub back: Option<Box<dyn Read + Send>>,
    pub child: Option<Child>,
}

/// The failure of a transport, in QEMU's words where it has them.
fn failed(what: String) -> Error {
    Error::Snapshot(what)
}

/// Opens the stream a source writes to.
///
/// # Errors
/// The peer cannot be reached (QEMU's `Failed to connect to '...': ...`), the command does
/// not start, or the descriptor is not there.
pub fn connect(uri: &Uri) -> Result<Outgoing> {
    let io = |e: std::io::Error| failed(format!("the migration socket: {}", reason(&e)));
    let (stream, back): (Box<dyn Write + Send>, Option<Box<dyn Read + Send>>) = match uri {
        Uri::Unix(path) => {
            let s = UnixStream::connect(path).map_err(|e| {
                failed(format!(
                    "Failed to connect to '{}': {}",
                    path.display(),
                    reason(&e)
                ))
            })?;
            let back = s.try_clone().map_err(io)?;
            back.set_read_timeout(Some(LOADED_TIMEOUT)).map_err(io)?;
            (Box::new(s), Some(Box::new(back)))
        }
        Uri::Tcp { host, port } => {
            let addr = Uri::tcp_addr(host, *port);
            let s = addr
                .to_socket_addrs()
                .map_err(|e| failed(format!("Failed to connect to '{addr}': {}", reason(&e))))?
                .find_map(|a| TcpStream::connect(a).ok())
                .ok_or_else(|| {
                    let e = TcpStream::connect(&addr)
                        .err()
                        .map_or_else(|| "no address".to_owned(), |e| reason(&e));
                    failed(format!("Failed to connect to '{addr}': {e}"))
                })?;
            let _ = s.set_nodelay(true);
            let back = s.try_clone().map_err(io)?;
            back.set_read_timeout(Some(LOADED_TIMEOUT)).map_err(io)?;
            (Box::new(s), Some(Box::new(back)))
        }
        Uri::Exec(cmd) => {
            let mut child = Command::new("sh")
                .args(["-c", cmd])
                .stdin(Stdio::piped())
                .spawn()
                .map_err(|e| failed(format!("cannot run '{cmd}': {}", reason(&e))))?;
            let stdin = child
                .stdin
                .take()
                .ok_or_else(|| failed(format!("'{cmd}' has no stdin")))?;
            return Ok(Outgoing {
                stream: Box::new(stdin),
                back: None,
                child: Some(child),
            });
        }
        // A descriptor's kind is the client's: a one-way pipe or file has no way back.
        Uri::Fd(token) => (Box::new(std::fs::File::from(take_fd(token)?)), None),
        Uri::File(_) => unreachable!("files are written by the snapshot path"),
    };
    Ok(Outgoing {
        stream,
        back,
        child: None,
    })
}

/// What a destination reads, and its way back to the source (unix, tcp).
pub struct Accepted {
    pub stream: Box<dyn Read + Send>,
    pub back: Option<Box<dyn Write + Send>>,
    pub child: Option<Child>,
}

/// A destination's listener, before the source connects.
pub enum Listening {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
    Exec(String),
    Fd(OwnedFd),
}

impl Drop for Listening {
    fn drop(&mut self) {
        if let Listening::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Starts listening where a destination waits (`--incoming`, `migrate-incoming`).
///
/// # Errors
/// The address cannot be bound, or the descriptor is not there.
pub fn listen(uri: &Uri) -> Result<Listening> {
    Ok(match uri {
        Uri::Unix(path) => {
            // A stale socket of an earlier run goes, as QEMU's does.
            if std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                let _ = std::fs::remove_file(path);
            }
            let l = UnixListener::bind(path).map_err(|e| {
                failed(format!(
                    "Failed to bind socket '{}': {}",
                    path.display(),
                    reason(&e)
                ))
            })?;
            Listening::Unix(l, path.clone())
        }
        Uri::Tcp { host, port } => {
            let addr = Uri::tcp_addr(host, *port);
            Listening::Tcp(
                TcpListener::bind(&addr).map_err(|e| {
                    failed(format!("Failed to bind socket '{addr}': {}", reason(&e)))
                })?,
            )
        }
        Uri::Exec(cmd) => Listening::Exec(cmd.clone()),
        Uri::Fd(token) => Listening::Fd(take_fd(token)?),
        Uri::File(_) => unreachable!("files are read by the snapshot path"),
    })
}

impl Listening {
    /// Waits for the source and returns what it sends, and a child to reap (`exec:`).
    ///
    /// # Errors
    /// The accept or the command fails.
    pub fn accept(&self) -> Result<Accepted> {
        let io = |e: std::io::Error| failed(format!("incoming migration: {}", reason(&e)));
        Ok(match self {
            Listening::Unix(l, _) => {
                let s = l.accept().map_err(io)?.0;
                two_way(s.try_clone().map_err(io)?, s)
            }
            Listening::Tcp(l) => {
                let s = l.accept().map_err(io)?.0;
                two_way(s.try_clone().map_err(io)?, s)
            }
            Listening::Exec(cmd) => {
                let mut child = Command::new("sh")
                    .args(["-c", cmd])
                    .stdout(Stdio::piped())
                    .spawn()
                    .map_err(io)?;
                let out = child
                    .stdout
                    .take()
                    .ok_or_else(|| failed(format!("'{cmd}' has no stdout")))?;
                Accepted {
                    stream: Box::new(out),
                    back: None,
                    child: Some(child),
                }
            }
            Listening::Fd(fd) => Accepted {
                stream: Box::new(std::fs::File::from(fd.try_clone().map_err(io)?)),
                back: None,
                child: None,
            },
        })
    }
}

/// An accepted socket: read from `stream`, the word back written to `back` (its clone).
fn two_way<S: Read + Write + Send + 'static>(stream: S, back: S) -> Accepted {
    Accepted {
        stream: Box::new(stream),
        back: Some(Box::new(back)),
        child: None,
    }
}

fn take_fd(token: &str) -> Result<OwnedFd> {
    qom::handover::take(token).ok_or_else(|| {
        failed(format!(
            "File descriptor named '{token}' has not been found"
        ))
    })
}

/// The host's reason, as `strerror` words it.
fn reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_owned(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemus_uris_parse_and_others_are_refused() {
        assert_eq!(
            Uri::parse("unix:/tmp/m.sock").unwrap(),
            Uri::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            Uri::parse("tcp:127.0.0.1:4444").unwrap(),
            Uri::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            }
        );
        assert_eq!(
            Uri::parse("tcp:[::1]:4444").unwrap(),
            Uri::Tcp {
                host: "::1".into(),
                port: 4444
            }
        );
        assert_eq!(
            Uri::parse("tcp::4444").unwrap(),
            Uri::Tcp {
                host: "".into(),
                port: 4444
            }
        );
        assert_eq!(
            Uri::parse("exec:cat > /tmp/x").unwrap(),
            Uri::Exec("cat > /tmp/x".into())
        );
        assert_eq!(Uri::parse("fd:mig").unwrap(), Uri::Fd("mig".into()));
        assert_eq!(Uri::parse("file:/x").unwrap(), Uri::File("/x".into()));
        for bad in [
            "bogus:x",
            "nothing",
            "tcp:host",
            "tcp:host:port",
            "unix:",
            "fd:",
        ] {
            assert!(
                matches!(Uri::parse(bad), Err(Error::BadUri { .. })),
                "{bad}"
            );
        }
        assert!(matches!(Uri::parse("file:"), Err(Error::NoPath)));
    }
}
