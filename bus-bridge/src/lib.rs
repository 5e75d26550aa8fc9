//! `bus-bridge`: the QMP and D-Bus front ends of qomu.
//!
//! Both translate their protocol into the same few [`qom::Tree`] operations and map the one
//! [`qom::Error`] type to their own error form in one function each. They depend on `qom`
//! only and know nothing of KVM.

pub mod dbus;
pub mod qmp;
pub mod socket;
