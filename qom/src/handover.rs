//! File descriptors a client handed over (QMP `getfd`, then `netdev_add tap fd=NAME`), on
//! their way from the front end that received them to the object that uses them.
//!
//! A front end deposits a descriptor and gets a token back; it sets that token as the
//! object's property (a `tap`'s `fd`), and the object takes the descriptor when it is
//! realized. Values in the tree stay plain data, and a descriptor is owned by exactly one
//! party at a time: the client's fd table, this table, or the object.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use parking_lot::Mutex;

static TABLE: Mutex<Option<HashMap<String, OwnedFd>>> = Mutex::new(None);

/// The prefix of every token, so an object can tell a token from a name a user typed.
pub const TOKEN_PREFIX: &str = "handover:";

/// Keeps `fd` until [`take`] with the returned token: 128 random bits, so a client that
/// types a token as a property value cannot take a descriptor another client handed over.
pub fn deposit(fd: OwnedFd) -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // Without the kernel's random bytes (never seen): a counter and the clock, still
        // unique, only guessable.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes[..8].copy_from_slice(&n.to_le_bytes());
        bytes[8..].copy_from_slice(&t.to_le_bytes());
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let token = format!("{TOKEN_PREFIX}{hex}");
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

/// Discards every token in `value` (a front end's arguments after the call that had them:
/// what the call did not take is closed).
pub fn discard_in(value: &crate::Value) {
    match value {
        crate::Value::Str(s) if s.starts_with(TOKEN_PREFIX) => discard(s),
        crate::Value::List(items) => items.iter().for_each(discard_in),
        crate::Value::Map(fields) => fields.iter().for_each(|(_, v)| discard_in(v)),
        _ => {}
    }
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
        assert_eq!(token.len(), TOKEN_PREFIX.len() + 32, "128 random bits");
        assert!(take(&token).is_some());
        assert!(take(&token).is_none(), "once");
    }
}
