//! `machine`: the KVM virtual machine, boot, run states, and the `qomu` binary.
//!
//! It registers `/machine` and its devices into the qom tree. The VM itself arrives with
//! the machine issue.
