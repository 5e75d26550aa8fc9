//! The ACPI PCI hotplug controller's registers, one bit per slot of the root bus, as plain
//! books kept by slot: which slots the guest must bring up (`PCIU`), which it is asked to
//! release (`PCID`), and what an eject it writes (`B0EJ`) means. No qom, no platform: the
//! caller acts on what [`Controller::write`] returns.
//!
//! | offset | name | access |
//! |---|---|---|
//! | 0x0 | `PCIU` | slots added since the last read (reading clears) |
//! | 0x4 | `PCID` | slots the host asks the guest to release (until ejected) |
//! | 0x8 | `B0EJ` | the guest writes a slot's bit to eject it (`_EJ0`) |

use serde::{Deserialize, Serialize};

pub const PCIU: u64 = 0;
pub const PCID: u64 = 4;
pub const B0EJ: u64 = 8;
/// The registers' size.
pub const LEN: u64 = 12;

/// A slot the guest ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eject {
    pub slot: u8,
    /// The host's request the eject answers; None if the host had asked nothing of the
    /// slot, and an eject nobody asked for does nothing.
    pub removal: Option<Removal>,
}

/// One request of the host to release a slot. The machine carries an eject out later,
/// on its control thread: by then the device may be gone and another plugged there (a
/// guest that writes `B0EJ` twice before the first is carried out, as a polling one may),
/// so an eject takes away only a device whose removal it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removal(u32);

/// The controller's books, and what a snapshot keeps of them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Controller {
    /// `PCIU`: added, not yet read by the guest.
    up: u32,
    /// `PCID`: asked to be released, not yet ejected.
    down: u32,
    /// Per slot, the number of the latest removal asked for.
    #[serde(skip)]
    removals: [u32; 32],
}

fn bit(slot: u8) -> u32 {
    1u32.checked_shl(u32::from(slot)).unwrap_or(0)
}

impl Controller {
    /// `slot` was plugged: the guest learns of it at its next read of `PCIU`.
    pub fn added(&mut self, slot: u8) {
        self.up |= bit(slot);
    }

    /// Asks the guest to release `slot`; false if that was asked already (and not
    /// answered yet).
    pub fn request_removal(&mut self, slot: u8) -> bool {
        let already = self.removal_requested(slot);
        self.down |= bit(slot);
        if !already && let Some(n) = self.removals.get_mut(usize::from(slot)) {
            *n = n.wrapping_add(1);
        }
        !already
    }

    /// The removal of `slot` that stands now, if one does.
    fn standing(&self, slot: u8) -> Option<Removal> {
        self.removal_requested(slot)
            .then(|| self.removals.get(usize::from(slot)).map(|&n| Removal(n)))
            .flatten()
    }

    /// The guest's eject answering `removal` is carried out: true, and the slot is
    /// forgotten ([`Controller::removed`]), if that removal still stands; false if the
    /// slot was emptied meanwhile, or holds another device now.
    pub fn take_removal(&mut self, slot: u8, removal: Removal) -> bool {
        if self.standing(slot) != Some(removal) {
            return false;
        }
        self.removed(slot);
        true
    }

    pub fn removal_requested(&self, slot: u8) -> bool {
        self.down & bit(slot) != 0
    }

    /// The slot is empty now: no request about it stands any more.
    pub fn removed(&mut self, slot: u8) {
        self.up &= !bit(slot);
        self.down &= !bit(slot);
    }

    /// `PCIU` (as the guest would read it, without clearing) and `PCID`.
    pub fn bits(&self) -> (u32, u32) {
        (self.up, self.down)
    }

    /// A guest read of the register at `offset`; reading `PCIU` clears it.
    pub fn read(&mut self, offset: u64) -> u32 {
        match offset {
            PCIU => std::mem::take(&mut self.up),
            PCID => self.down,
            _ => 0,
        }
    }

    /// A guest write of `value` at `offset` (4 bytes): for `B0EJ`, each slot whose bit it
    /// holds, and whether the host had asked for it. Only a slot the host asked to release
    /// can be ejected: a guest ejecting whatever it likes must not take devices away from
    /// under the host.
    pub fn write(&mut self, offset: u64, value: u32) -> Vec<Eject> {
        if offset != B0EJ {
            return Vec::new();
        }
        (0..32u8)
            .filter(|&s| value & bit(s) != 0)
            .map(|slot| Eject {
                slot,
                removal: self.standing(slot),
            })
            .collect()
    }

    /// A system reset: the guest rescans every slot, so pending additions are moot;
    /// requested removals stand.
    pub fn reset(&mut self) {
        self.up = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn additions_are_read_once() {
        let mut c = Controller::default();
        c.added(3);
        c.added(5);
        assert_eq!(c.read(PCIU), 1 << 3 | 1 << 5);
        assert_eq!(c.read(PCIU), 0, "reading PCIU clears it");
        c.added(7);
        c.reset();
        assert_eq!(c.read(PCIU), 0, "a reset forgets additions");
    }

    #[test]
    fn removals_stand_until_the_slot_is_ejected_and_removed() {
        let mut c = Controller::default();
        assert!(c.request_removal(4));
        assert!(!c.request_removal(4), "asked twice");
        assert!(c.removal_requested(4));
        assert_eq!(c.read(PCID), 1 << 4);
        assert_eq!(c.read(PCID), 1 << 4, "reading PCID does not clear it");
        c.reset();
        assert_eq!(c.read(PCID), 1 << 4, "a reset keeps the request");
        let ejects = c.write(B0EJ, 1 << 4 | 1 << 6);
        assert_eq!(ejects.len(), 2);
        assert_eq!((ejects[0].slot, ejects[1].slot), (4, 6));
        assert!(ejects[0].removal.is_some(), "asked for");
        assert_eq!(ejects[1].removal, None, "not asked for");
        // The eject itself changes nothing: the slot is forgotten once it is carried out.
        assert!(c.removal_requested(4));
        assert!(c.take_removal(4, ejects[0].removal.unwrap()));
        assert!(!c.removal_requested(4));
        assert_eq!(c.bits(), (0, 0));
    }

    /// A guest that writes B0EJ again before the first is carried out (the request still
    /// shows in PCID) must not take away the device plugged into the slot next, even once
    /// the host asks to remove that one too.
    #[test]
    fn a_second_eject_of_one_request_leaves_the_next_device_alone() {
        let mut c = Controller::default();
        c.request_removal(1);
        let first = c.write(B0EJ, 1 << 1)[0].removal.unwrap();
        let again = c.write(B0EJ, 1 << 1)[0].removal.unwrap();
        assert!(c.take_removal(1, first));
        // The next device in slot 1, and its own removal asked for.
        c.added(1);
        assert!(
            !c.take_removal(1, again),
            "nothing stands: the device stays"
        );
        assert!(c.request_removal(1));
        assert!(!c.take_removal(1, again), "another request's eject");
        assert!(c.removal_requested(1));
        let its_own = c.write(B0EJ, 1 << 1)[0].removal.unwrap();
        assert!(c.take_removal(1, its_own));
        assert_eq!(c.bits(), (0, 0));
    }

    #[test]
    fn other_writes_and_reads_do_nothing() {
        let mut c = Controller::default();
        c.request_removal(2);
        assert!(c.write(PCIU, u32::MAX).is_empty());
        assert!(c.write(PCID, u32::MAX).is_empty());
        assert_eq!(c.read(B0EJ), 0);
        assert_eq!(c.read(12), 0);
        assert_eq!(c.bits(), (0, 1 << 2));
        // Slots past 31 name no bit.
        c.added(40);
        assert_eq!(c.bits(), (0, 1 << 2));
    }
}
