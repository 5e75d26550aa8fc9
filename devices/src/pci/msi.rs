//! MSI routing: each MSI-X vector of a device is a GSI of its own (from 24 up, after the
//! IOAPIC's pins) with an eventfd registered with KVM as an irqfd, and a route in KVM's
//! GSI routing table that turns the GSI into the message the guest programmed (address
//! and data). Triggering a vector is one eventfd write; KVM injects the message.
//!
//! Vectors exist from the device's realize on, possibly before the VM does (`prelaunch`):
//! the router keeps every vector's eventfd and route, and hands them all to KVM once the
//! machine attaches its [`MsiChip`].

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

/// The first GSI handed to MSI vectors (0-23 are the IOAPIC's pins).
pub const MSI_GSI_BASE: u32 = 24;
/// One past the last (KVM's routing table holds 4096 entries; the irqchip takes 40).
pub const MSI_GSI_END: u32 = 4096;

/// What KVM offers for MSI routing; the machine implements it on its VM.
pub trait MsiChip: Send + Sync {
    /// Replaces the MSI routes, `(gsi, address, data)`; the irqchip's own routes stay.
    ///
    /// # Errors
    /// KVM refuses the table.
    fn set_msi_routes(&self, routes: &[(u32, u64, u32)]) -> std::io::Result<()>;
    /// Registers `fd` as an irqfd for `gsi`.
    ///
    /// # Errors
    /// KVM refuses.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> std::io::Result<()>;
    /// Unregisters it.
    ///
    /// # Errors
    /// KVM refuses.
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> std::io::Result<()>;
}

struct Entry {
    event: Arc<EventFd>,
    route: Option<(u64, u32)>,
}

/// Every MSI vector of the machine.
#[derive(Default)]
pub struct MsiRouter {
    chip: OnceLock<Arc<dyn MsiChip>>,
    vectors: Mutex<BTreeMap<u32, Entry>>,
}

impl MsiRouter {
    /// Hands every vector to KVM (once, when the VM exists).
    pub fn attach(&self, chip: Arc<dyn MsiChip>) {
        let vectors = self.vectors.lock();
        if self.chip.set(chip.clone()).is_err() {
            return;
        }
        for (&gsi, e) in vectors.iter() {
            if let Err(err) = chip.register_irqfd(&e.event, gsi) {
                tracing::warn!("MSI: cannot register the irqfd of GSI {gsi}: {err}");
            }
        }
        self.push_routes(&vectors);
    }

    /// A new vector, with no route yet.
    ///
    /// # Errors
    /// No eventfd, no free GSI, or KVM refuses the irqfd.
    pub fn vector(self: &Arc<Self>) -> std::io::Result<MsiVector> {
        let event = Arc::new(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?);
        let mut vectors = self.vectors.lock();
        let gsi = (MSI_GSI_BASE..MSI_GSI_END)
            .find(|g| !vectors.contains_key(g))
            .ok_or_else(|| std::io::Error::other("every MSI GSI is in use"))?;
        if let Some(chip) = self.chip.get() {
            chip.register_irqfd(&event, gsi)?;
        }
        vectors.insert(
            gsi,
            Entry {
                event: event.clone(),
                route: None,
            },
        );
        Ok(MsiVector {
            router: self.clone(),
            gsi,
            event,
        })
    }

    /// Number of vectors in use.
    pub fn len(&self) -> usize {
        self.vectors.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn set_route(&self, gsi: u32, route: Option<(u64, u32)>) {
        let mut vectors = self.vectors.lock();
        let Some(e) = vectors.get_mut(&gsi) else {
            return;
        };
        if e.route != route {
            e.route = route;
            self.push_routes(&vectors);
        }
    }

    fn remove(&self, gsi: u32) {
        let mut vectors = self.vectors.lock();
        let Some(e) = vectors.remove(&gsi) else {
            return;
        };
        if let Some(chip) = self.chip.get()
            && let Err(err) = chip.unregister_irqfd(&e.event, gsi)
        {
            tracing::warn!("MSI: cannot unregister the irqfd of GSI {gsi}: {err}");
        }
        if e.route.is_some() {
            self.push_routes(&vectors);
        }
    }

    fn push_routes(&self, vectors: &BTreeMap<u32, Entry>) {
        let Some(chip) = self.chip.get() else { return };
        let routes: Vec<(u32, u64, u32)> = vectors
            .iter()
            .filter_map(|(&gsi, e)| e.route.map(|(a, d)| (gsi, a, d)))
            .collect();
        if let Err(err) = chip.set_msi_routes(&routes) {
            tracing::warn!("MSI: KVM refused the routing table: {err}");
        }
    }
}

/// One MSI vector; dropping it frees its GSI and irqfd.
pub struct MsiVector {
    router: Arc<MsiRouter>,
    gsi: u32,
    event: Arc<EventFd>,
}

impl MsiVector {
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The message the vector sends (`None`: none programmed yet).
    pub fn set_route(&self, route: Option<(u64, u32)>) {
        self.router.set_route(self.gsi, route);
    }

    /// Sends the message.
    pub fn trigger(&self) {
        // A full counter (2^64-2 pending triggers) cannot happen; nothing to do on error.
        let _ = self.event.write(1);
    }
}

impl Drop for MsiVector {
    fn drop(&mut self) {
        self.router.remove(self.gsi);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Chip {
        log: Mutex<Vec<String>>,
    }

    impl MsiChip for Chip {
        fn set_msi_routes(&self, routes: &[(u32, u64, u32)]) -> std::io::Result<()> {
            self.log.lock().push(format!("routes {routes:x?}"));
            Ok(())
        }
        fn register_irqfd(&self, _fd: &EventFd, gsi: u32) -> std::io::Result<()> {
            self.log.lock().push(format!("irqfd {gsi}"));
            Ok(())
        }
        fn unregister_irqfd(&self, _fd: &EventFd, gsi: u32) -> std::io::Result<()> {
            self.log.lock().push(format!("un-irqfd {gsi}"));
            Ok(())
        }
    }

    #[test]
    fn vectors_made_before_the_vm_reach_kvm_when_it_attaches_and_free_their_gsi() {
        let router = Arc::new(MsiRouter::default());
        let a = router.vector().unwrap();
        let b = router.vector().unwrap();
        assert_eq!((a.gsi(), b.gsi()), (24, 25));
        a.set_route(Some((0xfee0_0000, 0x41)));
        let chip = Arc::new(Chip::default());
        router.attach(chip.clone());
        assert_eq!(
            *chip.log.lock(),
            ["irqfd 24", "irqfd 25", "routes [(18, fee00000, 41)]"]
        );
        chip.log.lock().clear();
        b.set_route(Some((0xfee0_1000, 0x42)));
        b.set_route(Some((0xfee0_1000, 0x42))); // unchanged: KVM is not asked again
        drop(a);
        let c = router.vector().unwrap();
        assert_eq!(c.gsi(), 24, "a freed GSI is handed out again");
        assert_eq!(
            *chip.log.lock(),
            [
                "routes [(18, fee00000, 41), (19, fee01000, 42)]",
                "un-irqfd 24",
                "routes [(19, fee01000, 42)]",
                "irqfd 24"
            ]
        );
        drop((b, c));
        assert!(router.is_empty());
    }
}
