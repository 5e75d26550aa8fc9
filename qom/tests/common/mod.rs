//! Test types shared by the tree-level tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use qom::{Action, Error, Field, Kind, NotifierDecl, PhasePolicy, Property, Tree, TypeInfo, Value};

/// Realize/unrealize calls, as "hook:object-name", across all tests (filter by name).
pub static HOOK_LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

pub fn hook_log_for(name: &str) -> Vec<String> {
    HOOK_LOG
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.ends_with(&format!(":{name}")))
        .cloned()
        .collect()
}

#[derive(Default)]
pub struct ApplianceState {
    pub counter: AtomicU64,
    pub brightness: AtomicU64,
}

/// A tree with test types:
/// - interface `switchable`;
/// - abstract `appliance` (implements switchable): `power` (bool, notifying), `label`
///   (before-realize), `slot` (prelaunch, 0..=31), notifier `tick {n}`, action
///   `bump {by, reason?} -> uint64`, a realize hook;
/// - `lamp` (appliance, user-creatable): `watts` (1..=100, default 40, notifying),
///   `brightness` (computed, refuses 13), `socket` (link<socket>);
/// - `socket` (user-creatable);
/// - `fragile` (appliance, user-creatable): realize fails when label is "bad".
pub fn test_tree() -> Tree {
    let b = Tree::builder();
    b.register(TypeInfo::interface("switchable", "interface"))
        .unwrap();
    b.register(
        TypeInfo::new("appliance", "object")
            .abstract_type()
            .implements("switchable")
            .constructor(|_| Ok(Arc::new(ApplianceState::default())))
            .property(
                Property::new("power", Kind::Bool)
                    .notifying()
                    .description("Switched on"),
            )
            .property(Property::new("label", Kind::Str).policy(PhasePolicy::BeforeRealize))
            .property(Property::new("slot", Kind::uint_range(0, 31)).policy(PhasePolicy::Prelaunch))
            .notifier(NotifierDecl::new(
                "tick",
                Kind::structure("Tick", vec![Field::new("n", Kind::uint64(), "count")]),
            ))
            .action(
                Action::new("bump", |obj, args| {
                    let st = obj.instance::<ApplianceState>().unwrap();
                    let by = args["by"].as_u64().unwrap();
                    let n = st.counter.fetch_add(by, Ordering::SeqCst) + by;
                    obj.notifier("tick")?
                        .emit(|| Value::map([("n", Value::UInt(n))]));
                    Ok(Some(Value::UInt(n)))
                })
                .arg(Field::new("by", Kind::uint32(), "how much"))
                .arg(Field::optional("reason", Kind::Str, "why"))
                .returns(Kind::uint64()),
            )
            .realize(|o| {
                HOOK_LOG
                    .lock()
                    .unwrap()
                    .push(format!("realize-appliance:{}", o.name()));
                Ok(())
            })
            .unrealize(|o| {
                HOOK_LOG
                    .lock()
                    .unwrap()
                    .push(format!("unrealize-appliance:{}", o.name()))
            }),
    )
    .unwrap();
    b.register(TypeInfo::new("socket", "object").implements("user-creatable"))
        .unwrap();
    b.register(
        TypeInfo::new("lamp", "appliance")
            .implements("user-creatable")
            .property(
                Property::new("watts", Kind::uint_range(1, 100))
                    .default(40u32)
                    .notifying(),
            )
            .property(
                Property::new("brightness", Kind::uint8())
                    .getter(|o| {
                        let st = o.instance::<ApplianceState>().unwrap();
                        Ok(Value::UInt(st.brightness.load(Ordering::SeqCst)))
                    })
                    .setter(|o, v| {
                        if v.as_u64() == Some(13) {
                            return Err(Error::failed("13 is unlucky"));
                        }
                        let st = o.instance::<ApplianceState>().unwrap();
                        st.brightness.store(v.as_u64().unwrap(), Ordering::SeqCst);
                        Ok(())
                    })
                    .notifying(),
            )
            .property(Property::link("socket", "socket")),
    )
    .unwrap();
    b.register(
        TypeInfo::new("fragile", "appliance")
            .implements("user-creatable")
            .realize(|o| {
                if o.get("label")?.as_str() == Some("bad") {
                    return Err(Error::failed("the label is bad"));
                }
                HOOK_LOG
                    .lock()
                    .unwrap()
                    .push(format!("realize-fragile:{}", o.name()));
                Ok(())
            })
            .unrealize(|o| {
                HOOK_LOG
                    .lock()
                    .unwrap()
                    .push(format!("unrealize-fragile:{}", o.name()))
            }),
    )
    .unwrap();
    b.build().unwrap()
}

pub fn props(list: &[(&str, Value)]) -> Vec<(String, Value)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// Every object's path, depth first, for comparing whole trees.
pub fn all_paths(tree: &Tree) -> Vec<String> {
    fn walk(o: &qom::ObjectRef, out: &mut Vec<String>) {
        out.push(o.path().to_owned());
        for c in o.children() {
            walk(&c, out);
        }
    }
    let mut out = Vec::new();
    walk(&tree.root(), &mut out);
    out
}
