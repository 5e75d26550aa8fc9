//! The Landlock limit: once locked down, qomu reaches only the files and directories the
//! VM was given (and those declared with `--sandbox-path`).

use std::path::PathBuf;

use landlock::{
    ABI, Access as _, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreated, RulesetCreatedAttr,
};

/// What a path may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read files (beneath it, for a directory).
    Read,
    /// Read and write files, and in a directory create, remove and bind sockets in it.
    ReadWrite,
}

/// A path qomu may reach once locked down.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathRule {
    pub path: PathBuf,
    pub access: Access,
}

impl std::str::FromStr for PathRule {
    type Err = String;

    /// `PATH[,access=ro|rw]` (rw when not said).
    fn from_str(text: &str) -> Result<PathRule, String> {
        let (path, access) = match text.rsplit_once(",access=") {
            Some((path, "ro")) => (path, Access::Read),
            Some((path, "rw")) => (path, Access::ReadWrite),
            Some((_, other)) => return Err(format!("'{other}': access is ro or rw")),
            None => (text, Access::ReadWrite),
        };
        if path.is_empty() {
            return Err("the path is empty".into());
        }
        Ok(PathRule {
            path: PathBuf::from(path),
            access,
        })
    }
}

/// The newest Landlock ABI qomu knows; older kernels get what they support.
const ABI_USED: ABI = ABI::V3;

/// The ruleset for `paths`, not yet applied; `None` where the kernel has no Landlock
/// (qomu then runs with seccomp and the privilege drop only, and says so).
pub(crate) fn ruleset(paths: &[PathRule]) -> Result<Option<RulesetCreated>, String> {
    if landlock_abi() == 0 {
        tracing::warn!("Landlock is not available on this kernel: file access is not limited");
        return Ok(None);
    }
    let all = AccessFs::from_all(ABI_USED);
    let read = AccessFs::from_read(ABI_USED);
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)
        .map_err(|e| e.to_string())?
        .create()
        .map_err(|e| e.to_string())?;
    for rule in paths {
        let fd = match PathFd::new(&rule.path) {
            Ok(fd) => fd,
            // A path that is not there yet (a socket or snapshot still to be made) is
            // covered by its directory, which the caller lists too.
            Err(_) => continue,
        };
        let is_dir = rule.path.is_dir();
        let access = match (rule.access, is_dir) {
            (Access::Read, _) => read,
            (Access::ReadWrite, true) => all,
            // Directory-only rights cannot be granted on a file.
            (Access::ReadWrite, false) => AccessFs::from_file(ABI_USED),
        };
        let access = if is_dir {
            access
        } else {
            access & AccessFs::from_file(ABI_USED)
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| format!("{}: {e}", rule.path.display()))?;
    }
    Ok(Some(ruleset))
}

/// The kernel's Landlock ABI version; 0 where it has none (or it is disabled).
fn landlock_abi() -> i64 {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: with a null attribute and size 0, the VERSION flag only returns a number.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    version.max(0)
}
