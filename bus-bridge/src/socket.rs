//! Unix listening sockets shared by the QMP and D-Bus peer-to-peer servers.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Binds `path` with mode 0600, replacing a stale socket left by a dead process.
///
/// # Errors
/// `path` exists and is not a socket, another process is listening on it, or it cannot
/// be bound.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
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
    // The socket appears at `path` only once it listens with its final mode: it is bound
    // under a temporary name beside it, then renamed. A client that waits for the file
    // (as libvirt and the tests do) never finds it refusing connections or open to others.
    let temporary = temporary_name(path);
    let (listener, bound) = match UnixListener::bind(&temporary) {
        Ok(listener) => (listener, temporary.as_path()),
        // A path too long for the longer name: bound where it goes, the mode set after.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => (UnixListener::bind(path)?, path),
        Err(e) => return Err(e),
    };
    let placed =
        std::fs::set_permissions(bound, std::fs::Permissions::from_mode(0o600)).and_then(|()| {
            match bound == path {
                true => Ok(()),
                false => std::fs::rename(bound, path),
            }
        });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(bound);
        return Err(e);
    }
    Ok(listener)
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
        let listener = bind_private(&path).unwrap();
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
            bind_private(&path).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        drop(listener);
        let again = bind_private(&path).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        drop(again);
        // Not a socket: refused, left alone.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"data").unwrap();
        assert_eq!(
            bind_private(&path).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        // A path with no room for the temporary name is bound directly, still private.
        let dir_len = dir.as_os_str().len();
        let long = dir.join("l".repeat(106 - dir_len));
        assert!(UnixListener::bind(temporary_name(&long)).is_err());
        let _listener = bind_private(&long).unwrap();
        let meta = std::fs::symlink_metadata(&long).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(UnixStream::connect(&long).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
