//! Device state across snapshots. Each type level that holds guest-visible state declares
//! it with [`qom::TypeInfo::state`]: a serde structure of its own, saved as JSON (small,
//! and readable with `jq` when a snapshot needs debugging). What a device derives from its
//! configuration (its properties, the image file's size) is not saved: the restoring side
//! builds the device from the same configuration and loads only what the guest changed.

use qom::{ObjectRef, TypedInfo};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;

/// Encodes one level's state.
///
/// # Errors
/// The state does not serialize (a bug in its type).
pub fn encode<T: Serialize>(obj: &ObjectRef, state: &T) -> crate::Result<Vec<u8>> {
    serde_json::to_vec(state).map_err(|e| Error::State {
        path: obj.path().to_owned(),
        why: e.to_string(),
    })
}

/// Decodes one level's state.
///
/// # Errors
/// The bytes are not this level's state.
pub fn decode<T: DeserializeOwned>(obj: &ObjectRef, bytes: &[u8]) -> crate::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::State {
        path: obj.path().to_owned(),
        why: e.to_string(),
    })
}

/// A type level's snapshot state as a serde structure `S`, made from and loaded into the
/// instance: `save` reads the instance, `load` writes what was read back into it.
pub(crate) trait SerdeState<T> {
    fn serde_state<S: Serialize + DeserializeOwned>(
        self,
        version: u32,
        save: impl Fn(&T) -> S + Send + Sync + 'static,
        load: impl Fn(&T, S) -> crate::Result<()> + Send + Sync + 'static,
    ) -> Self;
}

impl<T: Send + Sync + 'static> SerdeState<T> for TypedInfo<T> {
    fn serde_state<S: Serialize + DeserializeOwned>(
        self,
        version: u32,
        save: impl Fn(&T) -> S + Send + Sync + 'static,
        load: impl Fn(&T, S) -> crate::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.state(
            version,
            move |t, o| Ok(encode(o, &save(t))?),
            move |t, o, bytes| Ok(load(t, decode(o, bytes)?)?),
        )
    }
}
