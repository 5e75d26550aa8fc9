//! The receive filter a virtio-net driver programs through the control queue: RX modes
//! (`VIRTIO_NET_CTRL_RX`), the MAC tables and address (`VIRTIO_NET_CTRL_MAC`) and the
//! VLAN filter (`VIRTIO_NET_CTRL_VLAN`), applied to every frame from the host as QEMU's
//! `receive_filter` does, and shown by QMP's `query-rx-filter`. Pure: no queues, no qom.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET,
    VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, VIRTIO_NET_CTRL_RX_ALLUNI,
    VIRTIO_NET_CTRL_RX_NOBCAST, VIRTIO_NET_CTRL_RX_NOMULTI, VIRTIO_NET_CTRL_RX_NOUNI,
    VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD,
    VIRTIO_NET_CTRL_VLAN_DEL,
};

/// Entries the MAC table holds, unicast and multicast together (QEMU's
/// `MAC_TABLE_ENTRIES`); a driver that sets more gets the overflow mode.
pub const MAC_TABLE_ENTRIES: usize = 64;
/// VLAN ids.
pub const MAX_VLAN: usize = 4096;

pub type Mac = [u8; 6];

/// A MAC address as QEMU prints it (`52:54:00:12:34:56`).
pub fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A MAC address from its text; None if it is not six hex pairs separated by colons.
pub fn parse_mac(text: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// What a control command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acked (`VIRTIO_NET_OK`); whether the filter changed (NIC_RX_FILTER_CHANGED).
    Ok { changed: bool },
    /// Refused (`VIRTIO_NET_ERR`): unknown, or malformed; nothing changed.
    Err,
}

/// The receive filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RxFilter {
    pub promisc: bool,
    pub allmulti: bool,
    pub alluni: bool,
    pub nomulti: bool,
    pub nouni: bool,
    pub nobcast: bool,
    /// The address the NIC answers to (the configuration's; MAC_ADDR_SET changes it).
    pub mac: Mac,
    pub unicast: Vec<Mac>,
    pub multicast: Vec<Mac>,
    pub uni_overflow: bool,
    pub multi_overflow: bool,
    /// One bit per VLAN id.
    vlans: Vec<u32>,
    /// Whether the driver acked VIRTIO_NET_F_CTRL_VLAN (query-rx-filter's `vlan`).
    pub vlan_filtering: bool,
}

impl RxFilter {
    /// As after a reset: promiscuous, every VLAN, the tables empty (QEMU's state before a
    /// driver runs).
    pub fn new(mac: Mac) -> Self {
        RxFilter {
            promisc: true,
            allmulti: false,
            alluni: false,
            nomulti: false,
            nouni: false,
            nobcast: false,
            mac,
            unicast: Vec::new(),
            multicast: Vec::new(),
            uni_overflow: false,
            multi_overflow: false,
            vlans: vec![u32::MAX; MAX_VLAN / 32],
            vlan_filtering: false,
        }
    }

    /// The driver accepted its features: with CTRL_VLAN no VLAN passes until it adds
    /// one, without it every VLAN does.
    /// A filter restored from a snapshot, or already set for these features, is kept.
    pub fn features_acked(&mut self, ctrl_vlan: bool) {
        if self.vlan_filtering == ctrl_vlan {
            return;
        }
        self.vlan_filtering = ctrl_vlan;
        self.vlans.fill(if ctrl_vlan { 0 } else { u32::MAX });
    }

    /// The VLAN ids that pass, in order.
    pub fn vlan_table(&self) -> Vec<u16> {
        (0..MAX_VLAN as u16).filter(|&v| self.vlan(v)).collect()
    }

    fn vlan(&self, vid: u16) -> bool {
        self.vlans[usize::from(vid) >> 5] & (1 << (vid & 31)) != 0
    }

    /// Serves one control command: class, command and its data.
    pub fn command(&mut self, class: u8, cmd: u8, data: &[u8]) -> Outcome {
        let before = self.clone();
        let ok = match u32::from(class) {
            VIRTIO_NET_CTRL_RX => self.rx_mode(cmd, data),
            VIRTIO_NET_CTRL_MAC => self.mac_command(cmd, data),
            VIRTIO_NET_CTRL_VLAN => self.vlan_command(cmd, data),
            _ => false,
        };
        if !ok {
            *self = before;
            return Outcome::Err;
        }
        Outcome::Ok {
            changed: *self != before,
        }
    }

    fn rx_mode(&mut self, cmd: u8, data: &[u8]) -> bool {
        let [on] = data else { return false };
        let on = *on != 0;
        let flag = match u32::from(cmd) {
            VIRTIO_NET_CTRL_RX_PROMISC => &mut self.promisc,
            VIRTIO_NET_CTRL_RX_ALLMULTI => &mut self.allmulti,
            VIRTIO_NET_CTRL_RX_ALLUNI => &mut self.alluni,
            VIRTIO_NET_CTRL_RX_NOMULTI => &mut self.nomulti,
            VIRTIO_NET_CTRL_RX_NOUNI => &mut self.nouni,
            VIRTIO_NET_CTRL_RX_NOBCAST => &mut self.nobcast,
            _ => return false,
        };
        *flag = on;
        true
    }

    fn mac_command(&mut self, cmd: u8, data: &[u8]) -> bool {
        match u32::from(cmd) {
            VIRTIO_NET_CTRL_MAC_ADDR_SET => {
                let Ok(mac) = <Mac>::try_from(data) else {
                    return false;
                };
                self.mac = mac;
                true
            }
            VIRTIO_NET_CTRL_MAC_TABLE_SET => {
                // Two tables, each a 32-bit little-endian count and that many addresses.
                let Some((unicast, rest)) = mac_table(data) else {
                    return false;
                };
                let Some((multicast, [])) = mac_table(rest) else {
                    return false;
                };
                self.uni_overflow = unicast.len() > MAC_TABLE_ENTRIES;
                self.unicast = if self.uni_overflow {
                    Vec::new()
                } else {
                    unicast
                };
                self.multi_overflow = self.unicast.len() + multicast.len() > MAC_TABLE_ENTRIES;
                self.multicast = if self.multi_overflow {
                    Vec::new()
                } else {
                    multicast
                };
                true
            }
            _ => false,
        }
    }

    fn vlan_command(&mut self, cmd: u8, data: &[u8]) -> bool {
        let Ok(vid) = <[u8; 2]>::try_from(data).map(u16::from_le_bytes) else {
            return false;
        };
        if usize::from(vid) >= MAX_VLAN {
            return false;
        }
        let (word, bit) = (usize::from(vid) >> 5, 1u32 << (vid & 31));
        match u32::from(cmd) {
            VIRTIO_NET_CTRL_VLAN_ADD => self.vlans[word] |= bit,
            VIRTIO_NET_CTRL_VLAN_DEL => self.vlans[word] &= !bit,
            _ => return false,
        }
        true
    }

    /// Whether an Ethernet frame from the host reaches the guest (QEMU's rules).
    pub fn accepts(&self, frame: &[u8]) -> bool {
        if self.promisc {
            return true;
        }
        let Some(dest) = frame.get(..6) else {
            return false;
        };
        if frame.get(12..14) == Some(&[0x81, 0x00][..]) {
            let Some(tci) = frame.get(14..16) else {
                return false;
            };
            if !self.vlan(u16::from_be_bytes([tci[0], tci[1]]) & 0xfff) {
                return false;
            }
        }
        if dest[0] & 1 != 0 {
            if dest == [0xff; 6] {
                return !self.nobcast;
            }
            if self.nomulti {
                return false;
            }
            return self.allmulti
                || self.multi_overflow
                || self.multicast.iter().any(|m| m == dest);
        }
        if self.nouni {
            return false;
        }
        self.alluni
            || self.uni_overflow
            || dest == self.mac
            || self.unicast.iter().any(|m| m == dest)
    }
}

/// One MAC table of a MAC_TABLE_SET, and what follows it.
fn mac_table(data: &[u8]) -> Option<(Vec<Mac>, &[u8])> {
    let count = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let bytes = count.checked_mul(6)?;
    let table = data.get(4..4 + bytes)?;
    let macs = table
        .chunks_exact(6)
        .map(|c| <Mac>::try_from(c).unwrap_or_default())
        .collect();
    Some((macs, &data[4 + bytes..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn frame(dest: Mac) -> Vec<u8> {
        let mut f = dest.to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x00]);
        f.extend_from_slice(&[0; 46]);
        f
    }

    fn tagged(dest: Mac, vid: u16) -> Vec<u8> {
        let mut f = dest.to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x81, 0x00]);
        f.extend_from_slice(&vid.to_be_bytes());
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0; 46]);
        f
    }

    fn table(unicast: &[Mac], multicast: &[Mac]) -> Vec<u8> {
        let mut data = Vec::new();
        for t in [unicast, multicast] {
            data.extend_from_slice(&(t.len() as u32).to_le_bytes());
            for m in t {
                data.extend_from_slice(m);
            }
        }
        data
    }

    #[test]
    fn macs_print_and_parse_as_qemu_writes_them() {
        assert_eq!(format_mac(&MAC), "52:54:00:12:34:56");
        assert_eq!(parse_mac("52:54:00:12:34:56"), Some(MAC));
        assert_eq!(parse_mac("01:00:5E:00:00:01"), Some([1, 0, 0x5e, 0, 0, 1]));
        for bad in [
            "zz",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5:54:00:12:34:56",
            "",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn before_a_driver_everything_passes_then_only_what_it_asked_for() {
        let mut f = RxFilter::new(MAC);
        let other = [2, 0, 0, 0, 0, 9];
        assert!(f.accepts(&frame(other)), "promiscuous at start, as QEMU");
        f.features_acked(false);
        assert_eq!(f.command(0, 0, &[0]), Outcome::Ok { changed: true });
        assert!(f.accepts(&frame(MAC)));
        assert!(!f.accepts(&frame(other)));
        assert!(f.accepts(&frame([0xff; 6])), "broadcast");
        assert!(
            !f.accepts(&frame([1, 0, 0x5e, 0, 0, 1])),
            "a multicast not in the table"
        );
        assert!(f.accepts(&tagged(MAC, 7)), "every VLAN without CTRL_VLAN");
        // The same again changes nothing.
        assert_eq!(f.command(0, 0, &[0]), Outcome::Ok { changed: false });
        // nobcast, nouni, allmulti.
        assert_eq!(f.command(0, 5, &[1]), Outcome::Ok { changed: true });
        assert!(!f.accepts(&frame([0xff; 6])));
        assert_eq!(f.command(0, 1, &[1]), Outcome::Ok { changed: true });
        assert!(f.accepts(&frame([1, 0, 0x5e, 0, 0, 1])));
        assert_eq!(f.command(0, 4, &[1]), Outcome::Ok { changed: true });
        assert!(!f.accepts(&frame(MAC)));
    }

    #[test]
    fn mac_tables_address_and_overflow() {
        let mut f = RxFilter::new(MAC);
        f.command(0, 0, &[0]);
        let (uni, multi) = ([2, 0, 0, 0, 0, 7], [1, 0, 0x5e, 0, 0, 0xfb]);
        assert_eq!(
            f.command(1, 0, &table(&[uni], &[multi])),
            Outcome::Ok { changed: true }
        );
        assert!(f.accepts(&frame(uni)) && f.accepts(&frame(multi)));
        assert_eq!(
            (f.unicast.clone(), f.multicast.clone()),
            (vec![uni], vec![multi])
        );
        // 65 unicast addresses: overflow, every unicast passes.
        let many: Vec<Mac> = (0..65).map(|i| [2, 0, 0, 0, 1, i]).collect();
        assert_eq!(
            f.command(1, 0, &table(&many, &[])),
            Outcome::Ok { changed: true }
        );
        assert!(f.uni_overflow && f.unicast.is_empty());
        assert!(f.accepts(&frame([2, 9, 9, 9, 9, 9])));
        // A new address.
        let new = [2, 0xaa, 0, 0, 0, 1];
        assert_eq!(f.command(1, 1, &new), Outcome::Ok { changed: true });
        assert_eq!(f.mac, new);
    }

    #[test]
    fn malformed_or_unknown_commands_are_refused_and_change_nothing() {
        let mut f = RxFilter::new(MAC);
        let before = f.clone();
        for (class, cmd, data) in [
            (0u8, 0u8, &[][..]),
            (0, 0, &[1, 1][..]),
            (0, 9, &[1][..]),
            (1, 0, &[5, 0, 0, 0, 1, 2, 3][..]),
            (1, 0, &[0, 0, 0, 0][..]),
            (1, 1, &[1, 2, 3][..]),
            (2, 0, &[0x00, 0x10][..]),
            (2, 0, &[1][..]),
            (2, 7, &[1, 0][..]),
            (9, 0, &[][..]),
        ] {
            assert_eq!(
                f.command(class, cmd, data),
                Outcome::Err,
                "{class} {cmd} {data:?}"
            );
            assert_eq!(f, before);
        }
    }

    #[test]
    fn with_ctrl_vlan_only_added_vlans_pass() {
        let mut f = RxFilter::new(MAC);
        f.features_acked(true);
        f.command(0, 0, &[0]);
        assert!(f.vlan_table().is_empty());
        assert!(!f.accepts(&tagged(MAC, 7)));
        assert!(f.accepts(&frame(MAC)), "untagged frames pass");
        assert_eq!(
            f.command(2, 0, &7u16.to_le_bytes()),
            Outcome::Ok { changed: true }
        );
        assert!(f.accepts(&tagged(MAC, 7)));
        assert_eq!(f.vlan_table(), vec![7]);
        assert_eq!(
            f.command(2, 1, &7u16.to_le_bytes()),
            Outcome::Ok { changed: true }
        );
        assert!(!f.accepts(&tagged(MAC, 7)));
        assert_eq!(RxFilter::new(MAC).vlan_table().len(), MAX_VLAN);
    }
}
