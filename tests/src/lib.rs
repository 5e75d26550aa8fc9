//! Helpers of qomu's end-to-end tests (running a qomu process, guests, clients).
