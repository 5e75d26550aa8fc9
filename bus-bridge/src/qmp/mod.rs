//! The QMP front end, wire-compatible with QEMU (docs/qmp.md).
//!
//! [`session::Session`] is one connection's protocol state, transport-free;
//! [`server::QmpServer`] serves it on Unix sockets.

pub mod args;
pub mod commands;
pub mod error;
pub mod hmp;
pub mod json;
pub mod schema;
pub mod server;
pub mod session;
