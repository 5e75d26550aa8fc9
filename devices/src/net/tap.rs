//! A tap device: Ethernet frames to and from the host kernel, each behind a 12-byte
//! `virtio_net_hdr_v1` (`IFF_VNET_HDR`), so that a virtio-net device can pass the guest's
//! header through unchanged.
//!
//! Written over `libc`'s ioctl numbers rather than a crate: no published crate has a VMM's
//! tap (tun-rs does its own segmentation and GRO, which a virtio-net device must not);
//! cloud-hypervisor and Firecracker keep theirs internal (../shared/notes/net.md).

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::NetError;

/// Size of the header before every frame: `virtio_net_hdr_v1` (VIRTIO 1.x, with
/// `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

/// Longest interface name the kernel takes, without its NUL.
const IFNAMSIZ: usize = libc::IFNAMSIZ - 1;

/// `struct ifreq` as TUNSETIFF and TUNGETIFF use it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: libc::c_int) -> IfReq {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: flags as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }

    fn name(&self) -> String {
        CStr::from_bytes_until_nul(&self.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// An open tap, nonblocking, with vnet headers.
#[derive(Debug)]
pub struct Tap {
    file: File,
    ifname: String,
}

impl Tap {
    /// Opens `/dev/net/tun` and attaches to the tap `ifname`, creating it if it does not
    /// exist (an empty name: the kernel picks `tapN`). Needs CAP_NET_ADMIN, or a tap made
    /// beforehand for this user (`ip tuntap add dev NAME mode tap user UID`).
    ///
    /// # Errors
    /// [`NetError::TapConfigure`], with the kernel's reason, as QEMU words it.
    pub fn open(ifname: &str) -> Result<Tap, NetError> {
        let configure = |source| NetError::TapConfigure {
            ifname: ifname.to_owned(),
            source,
        };
        if ifname.len() > IFNAMSIZ || ifname.contains(['/', '\0']) {
            return Err(configure(io::Error::from_raw_os_error(libc::EINVAL)));
        }
        // SAFETY: a NUL-terminated path and plain flags; the result is checked.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(NetError::TunOpen(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut req = IfReq::new(ifname, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes an `ifreq`, which `req` is laid out as.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(configure(io::Error::last_os_error()));
        }
        let tap = Tap {
            file,
            ifname: req.name(),
        };
        tap.set_vnet_hdr_len().map_err(configure)?;
        Ok(tap)
    }

    /// Takes over an open tap file descriptor (QMP `getfd`, as libvirt hands them over):
    /// it must be a tap with vnet headers; it is made nonblocking.
    ///
    /// # Errors
    /// [`NetError::NotATap`] for another kind of file or a tap without vnet headers.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, NetError> {
        let file = File::from(fd);
        let mut req = IfReq::new("", 0);
        // SAFETY: TUNGETIFF writes an `ifreq`, which `req` is laid out as.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut req) } < 0 {
            return Err(NetError::NotATap {
                fd: file.as_raw_fd(),
                source: io::Error::last_os_error(),
            });
        }
        let flags = libc::c_int::from(req.flags);
        if flags & libc::IFF_TAP == 0 || flags & libc::IFF_VNET_HDR == 0 {
            return Err(NetError::UnusableTap(io::Error::other(
                "a tap opened with IFF_TAP and IFF_VNET_HDR is needed",
            )));
        }
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        unsafe {
            let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if fl < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(NetError::UnusableTap(io::Error::last_os_error()));
            }
        }
        let tap = Tap {
            file,
            ifname: req.name(),
        };
        tap.set_vnet_hdr_len().map_err(NetError::UnusableTap)?;
        Ok(tap)
    }

    fn set_vnet_hdr_len(&self) -> io::Result<()> {
        let len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface's name (the kernel's choice when none was asked for).
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Sets the offloads the kernel may hand frames with (`TUN_F_*`): only those the guest
    /// acked, or it would see frames with checksums still to fill in.
    ///
    /// # Errors
    /// The kernel's refusal.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes an unsigned int by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame, with its vnet header first, into `bufs`. `WouldBlock` when none is
    /// waiting.
    ///
    /// # Errors
    /// The read's error.
    pub fn read_frame(&self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let n = bufs.len().min(libc::c_int::MAX as usize) as libc::c_int;
        // SAFETY: `IoSliceMut` is ABI-compatible with `iovec`; the buffers outlive the call.
        let r = unsafe { libc::readv(self.file.as_raw_fd(), bufs.as_ptr().cast(), n) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Writes one frame, with its vnet header first, gathered from `bufs`. `WouldBlock`
    /// when the tap's queue is full.
    ///
    /// # Errors
    /// The write's error.
    pub fn write_frame(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: `IoSlice` is ABI-compatible with `iovec`; the buffers outlive the call.
        unsafe { self.write_iovecs(bufs.as_ptr().cast(), bufs.len()) }
    }

    /// [`Tap::write_frame`] from `n` raw pieces at `iov`.
    ///
    /// # Safety
    /// `iov` points at `n` iovecs, each naming memory readable until the call returns.
    ///
    /// # Errors
    /// The write's error.
    pub unsafe fn write_iovecs(&self, iov: *const libc::iovec, n: usize) -> io::Result<usize> {
        let n = n.min(libc::c_int::MAX as usize) as libc::c_int;
        // SAFETY: the caller's promise.
        let r = unsafe { libc::writev(self.file.as_raw_fd(), iov, n) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::test_netns::{Netns, arp_request, can_make_taps};

    #[test]
    fn a_name_the_kernel_cannot_take_is_refused_as_qemu_words_it() {
        let e = Tap::open("name-far-too-long-for-a-tap").unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not configure /dev/net/tun (name-far-too-long-for-a-tap): Invalid argument"
        );
        if !can_make_taps() {
            return;
        }
        // An interface that exists and is no tap: the kernel's EINVAL, as QEMU shows it.
        let e = Tap::open("lo").unwrap_err();
        assert!(
            e.to_string() == "could not configure /dev/net/tun (lo): Invalid argument",
            "{e}"
        );
    }

    #[test]
    fn a_descriptor_that_is_no_tap_is_refused() {
        let f = File::open("/dev/null").unwrap();
        let e = Tap::from_fd(OwnedFd::from(f)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Unable to query TUNGETIFF on FD ")
                && e.to_string().ends_with(": Inappropriate ioctl for device"),
            "{e}"
        );
    }

    /// The guest's side of a tap moved into a namespace this test made, with an address
    /// there: an ARP request for that address gets its reply. Traffic goes to nothing but
    /// that namespace, and every wait is bounded.
    #[test]
    fn frames_cross_a_tap_into_a_test_namespace_and_back() {
        if !can_make_taps() {
            return;
        }
        let ns = Netns::new("tap-unit");
        let tap = Tap::open(&ns.tap_name()).expect("open a tap");
        ns.take_tap(tap.ifname(), "10.0.2.2/24");
        let request = arp_request(
            [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            [10, 0, 2, 15],
            [10, 0, 2, 2],
        );
        let header = [0u8; VNET_HDR_LEN];
        let n = tap
            .write_frame(&[IoSlice::new(&header), IoSlice::new(&request)])
            .expect("write the ARP request");
        assert_eq!(n, VNET_HDR_LEN + request.len());
        let reply = ns.wait_frame(&tap, |f| {
            f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2]
        });
        // The reply is for the guest's MAC, from 10.0.2.2.
        assert_eq!(reply[0..6], [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(reply[28..32], [10, 0, 2, 2]);
        // Taken over by descriptor, as `getfd` hands one over: the same tap.
        // SAFETY: dup of a descriptor we own, owned by the new OwnedFd alone.
        let dup = unsafe { OwnedFd::from_raw_fd(libc::dup(tap.as_raw_fd())) };
        let again = Tap::from_fd(dup).expect("a tap by fd");
        assert_eq!(again.ifname(), tap.ifname());
    }
}
