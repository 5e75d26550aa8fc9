//! Unix listening sockets shared by the QMP and D-Bus peer-to-peer servers.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Who may connect to a socket qomu listens on, besides root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Access {
    /// Mode 0600: the user qomu runs as.
    #[default]
    Owner,
    /// Mode 0660, owned by this group: that user and the group's members.
    Group(u32),
}

/// A unix socket to listen on, and who may connect to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub path: PathBuf,
    pub access: Access,
}

impl From<PathBuf> for Listen {
    /// A socket for qomu's user only.
    fn from(path: PathBuf) -> Self {
        Listen {
            path,
            access: Access::Owner,
        }
    }
}

/// Binds `listen.path` with mode 0600 (or 0660 and its group), replacing a stale socket
/// left by a dead process.
///
/// # Errors
/// The path exists and is not a socket, another process is listening on it, it cannot
/// be bound, or the socket cannot be given to the group (qomu's user must be root or in
/// it).
pub fn bind(listen: &Listen) -> io::Result<UnixListener> {
    let path = listen.path.as_path();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // The socket appears at `path` only once it listens with its final mode and group: it
    // is bound under a temporary name beside it, then renamed. A client that waits for the
    // file (as libvirt and the tests do) never finds it refusing connections or open to
    // others.
    let temporary = temporary_name(path);
    let (listener, bound) = match UnixListener::bind(&temporary) {
        Ok(listener) => (listener, temporary.as_path()),
        // A path too long for the longer name: bound where it goes, the mode set after.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => (UnixListener::bind(path)?, path),
        Err(e) => return Err(e),
    };
    let placed = place(bound, listen.access).and_then(|()| match bound == path {
        true => Ok(()),
        false => std::fs::rename(bound, path),
    });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(bound);
        return Err(e);
    }
    Ok(listener)
}

/// Gives the socket at `bound` its mode and group: private first, the group's only once
/// the group is the right one.
fn place(bound: &Path, access: Access) -> io::Result<()> {
    std::fs::set_permissions(bound, std::fs::Permissions::from_mode(0o600))?;
    if let Access::Group(gid) = access {
        std::os::unix::fs::chown(bound, None, Some(gid)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot give it to group {gid} ({e}): qomu's user must be root or in that group"
                ),
            )
        })?;
        std::fs::set_permissions(bound, std::fs::Permissions::from_mode(0o660))?;
    }
    Ok(())
}

/// `DIR/.NAME.PID~` for `DIR/NAME`.
fn temporary_name(path: &Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy());
    path.with_file_name(format!(".{name}.{}~", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_appears_listening_private_and_alone() {
        let dir = std::env::temp_dir().join(format!("qomu-socket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = bind(&path.clone().into()).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(UnixStream::connect(&path).is_ok());
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["s.sock"], "no temporary left");
        // Taken while it listens; a stale one (nobody listening) is replaced.
        assert_eq!(
            bind(&path.clone().into()).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        drop(listener);
        let again = bind(&path.clone().into()).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        drop(again);
        // Not a socket: refused, left alone.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"data").unwrap();
        assert_eq!(
            bind(&path.clone().into()).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        // A path with no room for the temporary name is bound directly, still private.
        let dir_len = dir.as_os_str().len();
        let long = dir.join("l".repeat(106 - dir_len));
        assert!(UnixListener::bind(temporary_name(&long)).is_err());
        let _listener = bind(&long.clone().into()).unwrap();
        let meta = std::fs::symlink_metadata(&long).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(UnixStream::connect(&long).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A group's socket: 0660 and that group, once it appears; a group qomu's user may not
    /// give it to leaves nothing behind.
    #[test]
    fn a_group_socket_appears_with_its_group_and_mode() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("qomu-socket-group-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("g.sock");
        // SAFETY: getegid and geteuid have no preconditions.
        let (gid, root) = unsafe { (libc::getegid(), libc::geteuid() == 0) };
        let listen = Listen {
            path: path.clone(),
            access: Access::Group(gid),
        };
        let listener = bind(&listen).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), gid);
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        if !root {
            // A group this user is not in (0, root's): refused with the reason.
            let refused = bind(&Listen {
                path: path.clone(),
                access: Access::Group(0),
            })
            .unwrap_err();
            assert!(refused.to_string().contains("group 0"), "{refused}");
            assert!(
                std::fs::read_dir(&dir).unwrap().next().is_none(),
                "nothing left"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
