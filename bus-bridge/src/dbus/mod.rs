//! The D-Bus front end (docs/dbus.md): every object of the tree at an object path under
//! `/org/qomu/VM1`, with typed properties, actions as methods and notifiers as signals;
//! subscriptions owned by the caller's bus name.
//!
//! [`DbusBridge::start`] runs the bridge on a thread of its own (a zruntime executor): one
//! connection to a bus, and any number of peer-to-peer connections on Unix sockets.

mod bridge;
mod encode;
pub mod error;
mod events;
mod lanes;
pub mod names;
pub mod schema;
mod server;
pub mod values;

pub use bridge::BRIDGE_OWNER;
pub use server::{BusAddress, DbusBridge, DbusConfig, StartError};
