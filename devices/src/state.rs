//! Device state across snapshots. Each type level that holds guest-visible state declares
//! it with [`qom::TypeInfo::state`]: a serde structure of its own, saved as JSON (small,
//! and readable with `jq` when a snapshot needs debugging). What a device derives from its
//! configuration (its properties, the image file's size) is not saved: the restoring side
//! builds the device from the same configuration and loads only what the guest changed.

use qom::ObjectRef;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Encodes one level's state.
///
/// # Errors
/// The state does not serialize (a bug in its type).
pub fn encode<T: Serialize>(obj: &ObjectRef, state: &T) -> qom::Result<Vec<u8>> {
    serde_json::to_vec(state)
        .map_err(|e| qom::Error::failed(format!("cannot save the state of {}: {e}", obj.path())))
}

/// Decodes one level's state.
///
/// # Errors
/// The bytes are not this level's state.
pub fn decode<T: DeserializeOwned>(obj: &ObjectRef, bytes: &[u8]) -> qom::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        qom::Error::failed(format!(
            "the saved state of {} does not fit this device: {e}",
            obj.path()
        ))
    })
}
