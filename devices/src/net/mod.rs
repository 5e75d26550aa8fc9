//! Network backends: what a NIC's frames go to and come from on the host.
//!
//! - [`tap::Tap`]: a kernel tap, frames behind a virtio-net header (needs CAP_NET_ADMIN, or
//!   a tap made for this user beforehand);
//! - [`stream`]: QEMU's `-netdev stream` framing on a unix socket (passt, without root).
//!
//! These are the emulation cores, apart from qom: unit-tested here, with a tap moved into a
//! network namespace the test makes itself. The netdev objects, the NIC and the front ends
//! come on top (docs/network.md says what exists so far).

pub mod backend;
pub mod netdev;
pub mod port;
pub mod stream;
pub mod tap;
#[cfg(test)]
pub(crate) mod test_netns;

use std::io;

/// What a backend can fail with, in QEMU's words where QEMU has them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// `/dev/net/tun` cannot be opened (no module, no permission).
    #[error("could not open /dev/net/tun: {}", reason(.0))]
    TunOpen(#[source] io::Error),
    /// The kernel refused the tap (`TUNSETIFF`, `TUNSETVNETHDRSZ`).
    #[error("could not configure /dev/net/tun ({ifname}): {}", reason(.source))]
    TapConfigure {
        ifname: String,
        #[source]
        source: io::Error,
    },
    /// A descriptor handed over is not a tap at all (QEMU's text).
    #[error("Unable to query TUNGETIFF on FD {fd}: {}", reason(.source))]
    NotATap {
        fd: i32,
        #[source]
        source: io::Error,
    },
    /// A tap handed over that qomu cannot use as it is.
    #[error("the file descriptor is not a usable tap: {}", reason(.0))]
    UnusableTap(#[source] io::Error),
    /// A stream netdev cannot connect to its socket.
    #[error("could not connect to '{path}': {}", reason(.source))]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    /// A stream netdev cannot listen on its socket.
    #[error("could not listen on '{path}': {}", reason(.source))]
    Bind {
        path: String,
        #[source]
        source: io::Error,
    },
    /// An option qomu does not do, and why.
    #[error("{0}")]
    Unsupported(String),
}

/// The host's reason, as `strerror` words it (without Rust's "(os error N)").
fn reason(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_owned(),
        _ => text,
    }
}
