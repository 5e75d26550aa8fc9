//! `--run-as USER[:GROUP]`: qomu gives up root once it has opened what needs root (taps,
//! /dev/kvm, images), before any filter goes on. Supplementary groups are cleared first
//! (CVE-2011-2527: QEMU's -runas kept them), then the gid, then the uid; then the drop is
//! checked, and a way back to root must fail.

use std::ffi::CString;

/// A user (and group) to run as, resolved from the names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

impl std::str::FromStr for RunAs {
    type Err = String;

    /// `USER[:GROUP]`: names or numbers; without a group, the user's own.
    fn from_str(text: &str) -> Result<RunAs, String> {
        let (user, group) = match text.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (text, None),
        };
        let (uid, own_gid) = lookup_user(user)?;
        let gid = match group {
            Some(g) => lookup_group(g)?,
            None => own_gid,
        };
        Ok(RunAs {
            user: user.to_owned(),
            uid,
            gid,
        })
    }
}

fn lookup_user(name: &str) -> Result<(libc::uid_t, libc::gid_t), String> {
    let c = CString::new(name).map_err(|_| format!("'{name}': not a user name"))?;
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: an all-zero passwd is valid to be filled by getpwnam_r.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; `buf` outlives the use of `pwd`.
    let rc = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc == 0 && !found.is_null() {
        return Ok((pwd.pw_uid, pwd.pw_gid));
    }
    match name.parse::<libc::uid_t>() {
        Ok(uid) => Ok((uid, uid)),
        Err(_) => Err(format!("--run-as: no user '{name}'")),
    }
}

fn lookup_group(name: &str) -> Result<libc::gid_t, String> {
    group_id(name).ok_or_else(|| format!("--run-as: no group '{name}'"))
}

/// The id of the group named `name` (through the name service), or numbered `name`.
pub fn group_id(name: &str) -> Option<libc::gid_t> {
    let c = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: an all-zero group is valid to be filled by getgrnam_r.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc == 0 && !found.is_null() {
        return Some(grp.gr_gid);
    }
    name.parse::<libc::gid_t>().ok()
}

fn os_error(what: &str) -> String {
    format!("--run-as: {what}: {}", std::io::Error::last_os_error())
}

/// Drops to `who`: setgroups([]), setgid, setuid (glibc applies each to every thread), then
/// checks that the ids took and that root cannot be regained.
///
/// # Errors
/// A step failed, or the check did: qomu must not go on.
pub fn drop_privileges(who: &RunAs) -> Result<(), crate::Error> {
    let fail = |what: &str| crate::Error::RunAs(os_error(what));
    // SAFETY: plain credential system calls with valid arguments.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(fail("setgroups"));
        }
        if libc::setresgid(who.gid, who.gid, who.gid) != 0 {
            return Err(fail("setgid"));
        }
        if libc::setresuid(who.uid, who.uid, who.uid) != 0 {
            return Err(fail("setuid"));
        }
        let (mut r, mut e, mut s) = (0, 0, 0);
        libc::getresuid(&mut r, &mut e, &mut s);
        let (mut gr, mut ge, mut gs) = (0, 0, 0);
        libc::getresgid(&mut gr, &mut ge, &mut gs);
        let groups = libc::getgroups(0, std::ptr::null_mut());
        let back = who.uid != 0 && libc::setuid(0) == 0;
        if [r, e, s] != [who.uid; 3] || [gr, ge, gs] != [who.gid; 3] || groups != 0 || back {
            return Err(crate::Error::RunAs(format!(
                "--run-as {}: the drop did not take (uid {r}/{e}/{s}, gid {gr}/{ge}/{gs}, {groups} groups)",
                who.user
            )));
        }
    }
    Ok(())
}
