//! File descriptors a client handed over (QMP `getfd`, then `netdev_add tap fd=NAME`), on
//! their way from the front end that received them to the object that uses them.
//!
//! A front end deposits a descriptor and gets a token back; it sets that token as the
//! object's property (a `tap`'s `fd`), and the object takes the descriptor when it is
//! realized. Values in the tree stay plain data, and a descriptor is owned by exactly one
//! party at a time: the client's fd table, this table, or the object.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

static TABLE: Mutex<Option<HashMap<String, OwnedFd>>> = Mutex::new(None);
static NEXT: AtomicU64 = AtomicU64::new(1);

/// The prefix of every token, so an object can tell a token from a name a user typed.
pub const TOKEN_PREFIX: &str = "handover:";

/// Keeps `fd` until [`take`] with the returned token.
pub fn deposit(fd: OwnedFd) -> String {
    let token = format!("{TOKEN_PREFIX}{}", NEXT.fetch_add(1, Ordering::Relaxed));
    TABLE
        .lock()
        .get_or_insert_with(HashMap::new)
        .insert(token.clone(), fd);
    token
}

/// The descriptor deposited under `token`, once; `None` for any other text.
pub fn take(token: &str) -> Option<OwnedFd> {
    TABLE.lock().as_mut()?.remove(token)
}

/// Closes a deposited descriptor nobody took (the object was never made).
pub fn discard(token: &str) {
    drop(take(token));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_is_taken_once_by_its_token() {
        let fd = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let token = deposit(fd);
        assert!(token.starts_with(TOKEN_PREFIX));
        assert!(take("handover:0").is_none());
        assert!(take(&token).is_some());
        assert!(take(&token).is_none(), "once");
    }
}
