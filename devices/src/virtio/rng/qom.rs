//! The `virtio-rng-pci` type: the entropy backend it is linked to, if any.

use std::sync::Arc;

use qom::{PhasePolicy, Property, TypeInfo};

use super::{IDENTITY, Rng, Source};
use crate::device::get_string;
use crate::platform::PlatformRef;
use crate::rng::{RNG_BACKEND, RngBackend};
use crate::virtio::qom::virtio_type;

pub const TYPE: &str = "virtio-rng-pci";

pub(crate) fn register(platform: &PlatformRef) -> TypeInfo {
    virtio_type(
        TYPE,
        IDENTITY,
        platform,
        || Arc::new(()),
        |o, _| {
            let path = get_string(o, "rng")?;
            let source = if path.is_empty() {
                Source::Getrandom
            } else {
                let backend = o
                    .tree()
                    .lookup(&path)
                    .ok()
                    .and_then(|b| b.instance::<RngBackend>())
                    .ok_or(crate::Error::NotA {
                        path,
                        what: "an entropy backend",
                    })?;
                Source::Backend(backend)
            };
            Ok(Arc::new(Rng::new(source)))
        },
    )
    .description("virtio entropy device on PCI")
    .property(
        Property::link("rng", RNG_BACKEND)
            .policy(PhasePolicy::BeforeRealize)
            .description("The entropy backend object (rng-builtin, rng-random); none for the host's getrandom"),
    )
    .build()
}
