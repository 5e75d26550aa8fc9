//! The virtio 1.x common configuration structure as a plain state machine: feature
//! negotiation, the device status, each queue's set-up, the MSI-X vectors a driver picks,
//! and the configuration generation. No PCI, no threads, no guest memory: a register
//! write returns an [`Effect`] for the PCI function to act on (start the queues, reset).
//!
//! Register layout (virtio 1.x, 4.1.4.3):
//!
//! | offset | field |
//! |---|---|
//! | 0x00 / 0x04 | device_feature_select / device_feature |
//! | 0x08 / 0x0c | driver_feature_select / driver_feature |
//! | 0x10 | config_msix_vector |
//! | 0x12 | num_queues |
//! | 0x14 / 0x15 | device_status / config_generation |
//! | 0x16 | queue_select |
//! | 0x18 / 0x1a / 0x1c / 0x1e | queue_size / queue_msix_vector / queue_enable / queue_notify_off |
//! | 0x20 / 0x28 / 0x30 | queue_desc / queue_driver / queue_device (64-bit) |

use serde::{Deserialize, Serialize};

use super::{
    F_EVENT_IDX, F_VERSION_1, STATUS_DRIVER_OK, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
    TRANSPORT_FEATURES,
};

/// The structure's size.
pub const COMMON_LEN: u64 = 0x38;
/// "No vector" for MSI-X vector fields.
pub const NO_VECTOR: u16 = 0xffff;

/// One queue as the driver set it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub vector: u16,
}

/// What a register write asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    None,
    /// The driver wrote 0 to the status: the device must reset (the transport already has).
    Reset,
    /// The driver set DRIVER_OK having accepted these features: the queues start.
    DriverOk {
        features: u64,
    },
    /// The driver enabled this queue (the function checks its addresses).
    QueueEnabled(usize),
    /// An MSI-X vector choice changed.
    VectorsChanged,
}

/// The common configuration's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transport {
    offered: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queue_max: u16,
    /// Each queue's largest size where a model sets them (empty: `queue_max` for all;
    /// snapshots from before per-queue sizes have none).
    #[serde(default)]
    queue_maxes: Vec<u16>,
    queues: Vec<QueueConfig>,
    config_vector: u16,
    /// Vectors the MSI-X table has (choices past it read back as NO_VECTOR).
    msix_vectors: u16,
    generation: u8,
}

fn fresh_queue(max: u16) -> QueueConfig {
    QueueConfig {
        size: max,
        ready: false,
        desc_table: 0,
        avail_ring: 0,
        used_ring: 0,
        vector: NO_VECTOR,
    }
}

impl Transport {
    /// A transport for `queues` queues of at most `queue_max` entries and an MSI-X table
    /// of `msix_vectors` entries, offering the transport's own features until
    /// [`Transport::offer`] adds a model's.
    pub fn new(queues: usize, queue_max: u16, msix_vectors: u16) -> Self {
        Transport {
            offered: TRANSPORT_FEATURES,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queue_max,
            queue_maxes: Vec::new(),
            queues: vec![fresh_queue(queue_max); queues],
            config_vector: NO_VECTOR,
            msix_vectors,
            generation: 0,
        }
    }

    /// The largest size of queue `index` (what the driver reads before choosing).
    pub fn queue_max(&self, index: usize) -> u16 {
        self.queue_maxes
            .get(index)
            .copied()
            .unwrap_or(self.queue_max)
    }

    /// The model's largest size for each queue (before a driver runs).
    pub fn set_queue_maxes(&mut self, maxes: Vec<u16>) {
        for (q, &max) in self.queues.iter_mut().zip(&maxes) {
            if !q.ready {
                q.size = max;
            }
        }
        self.queue_maxes = maxes;
    }

    /// Offers the model's `features` besides the transport's.
    pub fn offer(&mut self, features: u64) {
        self.offered = features | TRANSPORT_FEATURES;
    }

    pub fn offered(&self) -> u64 {
        self.offered
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub fn queues(&self) -> &[QueueConfig] {
        &self.queues
    }

    pub fn config_vector(&self) -> u16 {
        self.config_vector
    }

    pub fn generation(&self) -> u8 {
        self.generation
    }

    /// Whether the driver accepted EVENT_IDX.
    pub fn event_idx(&self) -> bool {
        self.driver_features & F_EVENT_IDX != 0
    }

    /// The device-specific configuration changed: drivers reading it see a new
    /// generation (the function raises the configuration interrupt).
    pub fn config_changed(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    /// The device cannot go on (a queue at addresses outside RAM): DEVICE_NEEDS_RESET, and
    /// the queue is left disabled.
    pub fn needs_reset(&mut self, queue: usize) {
        if let Some(q) = self.queues.get_mut(queue) {
            q.ready = false;
        }
        self.status |= STATUS_NEEDS_RESET;
    }

    /// Back to the state after power-on: what a status write of 0 does.
    pub fn reset(&mut self) {
        let mut fresh = Transport::new(self.queues.len(), self.queue_max, self.msix_vectors);
        fresh.set_queue_maxes(std::mem::take(&mut self.queue_maxes));
        *self = Transport {
            offered: self.offered,
            generation: self.generation,
            ..fresh
        };
    }

    /// A vector the driver asks for, or NO_VECTOR if the table has no such entry (the
    /// driver reads it back to learn that).
    fn vector(&self, v: u16) -> u16 {
        if v < self.msix_vectors { v } else { NO_VECTOR }
    }

    fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn selected_mut(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// A read of the field at `offset`: the field's first offset and its value.
    pub fn read(&self, offset: u64) -> (u64, u64) {
        let q = self.selected();
        let queue = |f: fn(&QueueConfig) -> u64| q.map_or(0, f);
        match offset {
            0x00..=0x03 => (0x00, u64::from(self.device_feature_select)),
            0x04..=0x07 => (
                0x04,
                match self.device_feature_select {
                    0 => self.offered & 0xffff_ffff,
                    1 => self.offered >> 32,
                    _ => 0,
                },
            ),
            0x08..=0x0b => (0x08, u64::from(self.driver_feature_select)),
            0x0c..=0x0f => (
                0x0c,
                match self.driver_feature_select {
                    0 => self.driver_features & 0xffff_ffff,
                    1 => self.driver_features >> 32,
                    _ => 0,
                },
            ),
            0x10 | 0x11 => (0x10, u64::from(self.config_vector)),
            0x12 | 0x13 => (0x12, self.queues.len() as u64),
            0x14 => (0x14, u64::from(self.status)),
            0x15 => (0x15, u64::from(self.generation)),
            0x16 | 0x17 => (0x16, u64::from(self.queue_select)),
            0x18 | 0x19 => (0x18, queue(|q| q.size.into())),
            0x1a | 0x1b => (0x1a, q.map_or(u64::from(NO_VECTOR), |q| q.vector.into())),
            0x1c | 0x1d => (0x1c, queue(|q| q.ready.into())),
            // Every queue notifies at its index times the multiplier.
            0x1e | 0x1f => (0x1e, q.map_or(0, |_| self.queue_select.into())),
            0x20..=0x27 => (0x20, queue(|q| q.desc_table)),
            0x28..=0x2f => (0x28, queue(|q| q.avail_ring)),
            0x30..=0x37 => (0x30, queue(|q| q.used_ring)),
            _ => (offset, 0),
        }
    }

    /// A driver's write of `data` (1, 2, 4 or 8 bytes) at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Effect {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(bytes);
        let (low, high) = (v as u32, (v >> 32) as u32);
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = low,
            (0x08, 4) => {
                self.driver_feature_select = low;
            }
            (0x0c, 4) => {
                // Features are fixed once FEATURES_OK is set.
                if self.status & STATUS_FEATURES_OK == 0 {
                    match self.driver_feature_select {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(low)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | u64::from(low) << 32
                        }
                        _ => {}
                    }
                }
            }
            (0x10, 2) => {
                self.config_vector = self.vector(low as u16);
                return Effect::VectorsChanged;
            }
            (0x14, 1) => return self.write_status(low as u8),
            (0x16, 2) => self.queue_select = low as u16,
            (0x18, 2) => {
                let size = low as u16;
                let max = self.queue_max(usize::from(self.queue_select));
                if let Some(q) = self.selected_mut()
                    && !q.ready
                    && size.is_power_of_two()
                    && size <= max
                {
                    q.size = size;
                }
            }
            (0x1a, 2) => {
                let v = self.vector(low as u16);
                if let Some(q) = self.selected_mut() {
                    q.vector = v;
                    return Effect::VectorsChanged;
                }
            }
            (0x1c, 2) => {
                let index = usize::from(self.queue_select);
                if low & 1 == 1
                    && let Some(q) = self.selected_mut()
                    && !q.ready
                {
                    q.ready = true;
                    return Effect::QueueEnabled(index);
                }
            }
            (0x20 | 0x28 | 0x30, 4 | 8) | (0x24 | 0x2c | 0x34, 4) => {
                let base = offset & !7;
                if let Some(q) = self.selected_mut()
                    && !q.ready
                {
                    let field = match base {
                        0x20 => &mut q.desc_table,
                        0x28 => &mut q.avail_ring,
                        _ => &mut q.used_ring,
                    };
                    *field = match (offset & 4, data.len()) {
                        (0, 8) => v,
                        (0, _) => (*field & !0xffff_ffff) | u64::from(low),
                        _ => (*field & 0xffff_ffff) | u64::from(low) << 32,
                    };
                }
                let _ = high;
            }
            _ => tracing::debug!(
                "virtio: ignored common write at {offset:#x}, {} bytes",
                data.len()
            ),
        }
        Effect::None
    }

    fn write_status(&mut self, status: u8) -> Effect {
        if status == 0 {
            self.reset();
            return Effect::Reset;
        }
        let mut status = status;
        let newly = status & !self.status;
        if newly & STATUS_FEATURES_OK != 0 {
            // Only what was offered, and only as a virtio 1.x driver.
            let acceptable = self.driver_features & !self.offered == 0
                && self.driver_features & F_VERSION_1 != 0;
            if !acceptable {
                status &= !STATUS_FEATURES_OK;
            }
        }
        // NEEDS_RESET is the device's to set; a driver keeps it only by reading it back.
        status = (status & !STATUS_NEEDS_RESET) | (self.status & STATUS_NEEDS_RESET);
        self.status = status;
        if newly & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK != 0 {
            return Effect::DriverOk {
                features: self.driver_features,
            };
        }
        Effect::None
    }
}

#[cfg(test)]
mod tests {
    use super::super::{STATUS_ACKNOWLEDGE, STATUS_DRIVER};
    use super::*;

    fn w16(v: u16) -> [u8; 2] {
        v.to_le_bytes()
    }

    fn w32(v: u32) -> [u8; 4] {
        v.to_le_bytes()
    }

    /// Accepts `features` as a driver does, word by word.
    fn accept(t: &mut Transport, features: u64) {
        for word in 0..2u32 {
            t.write(0x08, &w32(word));
            t.write(0x0c, &w32((features >> (32 * word)) as u32));
        }
    }

    fn offered(t: &mut Transport) -> u64 {
        t.write(0x00, &w32(0));
        let low = t.read(0x04).1;
        t.write(0x00, &w32(1));
        let high = t.read(0x04).1;
        low | high << 32
    }

    #[test]
    fn features_are_offered_and_negotiated_by_virtio_1_rules() {
        let mut t = Transport::new(1, 256, 2);
        t.offer(1 << 9);
        assert_eq!(offered(&mut t), 1 << 9 | TRANSPORT_FEATURES);
        t.write(0x00, &w32(2));
        assert_eq!(t.read(0x04).1, 0, "no third feature word");

        // A legacy driver (no VERSION_1) is refused: FEATURES_OK reads back clear.
        t.write(0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER]);
        accept(&mut t, 1 << 9);
        t.write(
            0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK],
        );
        assert_eq!(t.status() & STATUS_FEATURES_OK, 0);
        // So is a driver accepting a feature that was not offered.
        accept(&mut t, F_VERSION_1 | 1 << 3);
        t.write(
            0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK],
        );
        assert_eq!(t.status() & STATUS_FEATURES_OK, 0);
        // What was offered is accepted; then the features are fixed.
        accept(&mut t, F_VERSION_1 | F_EVENT_IDX | 1 << 9);
        t.write(
            0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK],
        );
        assert_ne!(t.status() & STATUS_FEATURES_OK, 0);
        accept(&mut t, F_VERSION_1);
        assert_eq!(t.driver_features(), F_VERSION_1 | F_EVENT_IDX | 1 << 9);
        assert!(t.event_idx());
        t.write(0x08, &w32(1));
        assert_eq!(t.read(0x0c).1, u64::from((F_VERSION_1 >> 32) as u32));
        // DRIVER_OK starts the device once, with the features.
        assert_eq!(
            t.write(
                0x14,
                &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK]
            ),
            Effect::DriverOk {
                features: F_VERSION_1 | F_EVENT_IDX | 1 << 9
            }
        );
        assert_eq!(
            t.write(
                0x14,
                &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK]
            ),
            Effect::None
        );
    }

    #[test]
    fn driver_ok_without_features_ok_starts_nothing() {
        let mut t = Transport::new(1, 256, 2);
        assert_eq!(
            t.write(
                0x14,
                &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK]
            ),
            Effect::None
        );
    }

    #[test]
    fn queues_are_set_up_only_while_disabled() {
        let mut t = Transport::new(2, 256, 3);
        assert_eq!(t.read(0x12).1, 2);
        t.write(0x16, &w16(1));
        assert_eq!(t.read(0x18).1, 256, "size starts at the maximum");
        assert_eq!(t.read(0x1e).1, 1, "notify offset is the index");
        t.write(0x18, &w16(100));
        assert_eq!(t.read(0x18).1, 256, "not a power of two");
        t.write(0x18, &w16(512));
        assert_eq!(t.read(0x18).1, 256, "over the maximum");
        t.write(0x18, &w16(64));
        t.write(0x20, &0x1234_5678_9abc_def0u64.to_le_bytes());
        t.write(0x28, &w32(0x2000));
        t.write(0x2c, &w32(0x1));
        t.write(0x30, &w32(0x3000));
        assert_eq!(t.write(0x1c, &w16(1)), Effect::QueueEnabled(1));
        let q = t.queues()[1];
        assert_eq!(
            (q.size, q.ready, q.desc_table, q.avail_ring, q.used_ring),
            (64, true, 0x1234_5678_9abc_def0, 0x1_0000_2000, 0x3000)
        );
        // Enabled: addresses and size stay; enabling again does nothing.
        t.write(0x18, &w16(8));
        t.write(0x30, &w32(0x9000));
        assert_eq!(t.write(0x1c, &w16(1)), Effect::None);
        assert_eq!(t.queues()[1], q);
        // A queue that does not exist reads as zero and takes nothing.
        t.write(0x16, &w16(5));
        assert_eq!(t.read(0x18).1, 0);
        assert_eq!(t.read(0x1a).1, u64::from(NO_VECTOR));
        assert_eq!(t.write(0x1c, &w16(1)), Effect::None);
        t.needs_reset(1);
        assert!(!t.queues()[1].ready);
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn vectors_past_the_table_read_back_as_none() {
        let mut t = Transport::new(1, 256, 2);
        assert_eq!(t.write(0x10, &w16(1)), Effect::VectorsChanged);
        assert_eq!(t.config_vector(), 1);
        t.write(0x10, &w16(2));
        assert_eq!(t.read(0x10).1, u64::from(NO_VECTOR));
        t.write(0x1a, &w16(0));
        assert_eq!(t.queues()[0].vector, 0);
        t.write(0x1a, &w16(7));
        assert_eq!(t.queues()[0].vector, NO_VECTOR);
    }

    #[test]
    fn a_status_of_zero_resets_all_but_the_offer_and_generation() {
        let mut t = Transport::new(1, 256, 2);
        t.offer(1 << 5);
        t.config_changed();
        accept(&mut t, F_VERSION_1);
        t.write(0x14, &[STATUS_ACKNOWLEDGE]);
        t.write(0x10, &w16(1));
        t.write(0x1c, &w16(1));
        assert_eq!(t.read(0x15).1, 1, "generation");
        assert_eq!(t.write(0x14, &[0]), Effect::Reset);
        assert_eq!(t.status(), 0);
        assert_eq!(t.driver_features(), 0);
        assert_eq!(t.config_vector(), NO_VECTOR);
        assert!(!t.queues()[0].ready);
        assert_eq!(t.offered(), 1 << 5 | TRANSPORT_FEATURES);
        assert_eq!(t.generation(), 1);
        // Odd-sized or misplaced writes change nothing.
        let before = t.clone();
        t.write(0x14, &w16(7));
        t.write(0x00, &[1]);
        t.write(0x40, &w32(1));
        assert_eq!(t, before);
    }

    #[test]
    fn the_driver_cannot_clear_needs_reset_by_writing_the_status() {
        let mut t = Transport::new(1, 256, 2);
        t.write(0x14, &[STATUS_ACKNOWLEDGE]);
        t.needs_reset(0);
        t.write(0x14, &[STATUS_ACKNOWLEDGE | STATUS_DRIVER]);
        assert_ne!(t.status() & STATUS_NEEDS_RESET, 0);
    }
}
