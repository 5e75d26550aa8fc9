//! Notifiers and the events they emit.
//!
//! A [`Notifier`] handle is what emitting code (a vCPU thread, a device) keeps. With no
//! subscriber, [`Notifier::emit`] costs one atomic load and never builds the payload.
//! [`Notifier::emit_fields`] takes the payload as an array of fields: filters read them
//! where they are, and the payload map is only allocated for an event that is delivered.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::RwLock;

use crate::kind::Kind;
use crate::subscription::Subscription;
use crate::value::Value;

/// A declared notifier of a type: a named event source with a payload schema.
#[derive(Debug, Clone)]
pub struct NotifierDecl {
    pub(crate) name: Arc<str>,
    pub(crate) payload: Kind,
    pub(crate) description: String,
}

impl NotifierDecl {
    /// A notifier whose events carry values of `payload` (normally a struct kind).
    pub fn new(name: &str, payload: Kind) -> Self {
        NotifierDecl {
            name: name.into(),
            payload,
            description: String::new(),
        }
    }

    pub fn description(mut self, text: &str) -> Self {
        self.description = text.to_owned();
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn payload(&self) -> &Kind {
        &self.payload
    }
    pub fn description_text(&self) -> &str {
        &self.description
    }
}

/// One emitted event, shared by every subscription it is delivered to.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Increases with every event of the process; orders events across subscriptions.
    pub seq: u64,
    /// Wall-clock time of the emission (QMP's `timestamp`).
    pub time: SystemTime,
    /// Canonical path of the emitting object.
    pub source: Arc<str>,
    /// Type of the emitting object.
    pub source_type: Arc<str>,
    pub notifier: Arc<str>,
    pub data: Value,
}

static EVENT_SEQ: AtomicU64 = AtomicU64::new(1);

/// The attachment index of a subscription to every notifier of an object (`*`).
pub(crate) const ALL_NOTIFIERS: u16 = u16::MAX;

/// A subscription attached to one object, for one of its notifiers (or all of them).
pub(crate) struct Attachment {
    pub(crate) index: u16,
    pub(crate) sub: Arc<Subscription>,
}

/// Per-object event state: which notifiers have subscribers, and the subscriptions.
///
/// Kept apart from the object itself so that emitters (and instances holding notifier
/// handles) never keep the object, its instance or the tree alive.
pub(crate) struct EventSlot {
    pub(crate) path: Arc<str>,
    pub(crate) type_name: Arc<str>,
    /// Bit `min(index, 63)` is set while some subscription listens to notifier `index`.
    mask: AtomicU64,
    subs: RwLock<Vec<Attachment>>,
}

fn mask_bit(index: u16) -> u64 {
    if index == ALL_NOTIFIERS {
        u64::MAX
    } else {
        1u64 << index.min(63)
    }
}

impl EventSlot {
    pub(crate) fn new(path: Arc<str>, type_name: Arc<str>) -> Self {
        EventSlot {
            path,
            type_name,
            mask: AtomicU64::new(0),
            subs: RwLock::new(Vec::new()),
        }
    }

    pub(crate) fn attach(&self, index: u16, sub: Arc<Subscription>) {
        let mut subs = self.subs.write();
        subs.push(Attachment { index, sub });
        self.mask.fetch_or(mask_bit(index), Ordering::Release);
    }

    pub(crate) fn detach(&self, sub_id: u64) {
        let mut subs = self.subs.write();
        subs.retain(|a| a.sub.id() != sub_id);
        let mask = subs.iter().fold(0, |m, a| m | mask_bit(a.index));
        self.mask.store(mask, Ordering::Release);
    }

    /// Delivers an event of notifier `index` to its subscriptions; builds the payload only
    /// if at least one subscription matches.
    #[inline]
    pub(crate) fn emit(&self, index: u16, name: &Arc<str>, data: impl FnOnce() -> Value) {
        if self.mask.load(Ordering::Acquire) & mask_bit(index) == 0 {
            return;
        }
        self.emit_slow(index, name, Built(Some(data), None));
    }

    /// As [`EventSlot::emit`], with the payload as fields (see [`Notifier::emit_fields`]).
    #[inline]
    pub(crate) fn emit_fields<const N: usize>(
        &self,
        index: u16,
        name: &Arc<str>,
        fields: impl FnOnce() -> [(&'static str, Value); N],
        check: impl Fn(&Value),
    ) {
        if self.mask.load(Ordering::Acquire) & mask_bit(index) == 0 {
            return;
        }
        self.emit_slow(index, name, Listed::<_, _, N>(Some(fields), None, check));
    }

    #[cold]
    fn emit_slow(&self, index: u16, name: &Arc<str>, mut payload: impl Payload) {
        let subs = self.subs.read();
        // The payload is made for the first subscription that listens, and the event (a
        // clock read and an allocation) only once a filter lets the payload through.
        let mut event: Option<Arc<Event>> = None;
        for a in subs
            .iter()
            .filter(|a| a.index == index || a.index == ALL_NOTIFIERS)
        {
            let passes = match &event {
                Some(e) => a.sub.passes(&e.data),
                None => a.sub.passes(payload.view()),
            };
            if !passes {
                continue;
            }
            let event = event.get_or_insert_with(|| {
                Arc::new(Event {
                    seq: EVENT_SEQ.fetch_add(1, Ordering::Relaxed),
                    time: SystemTime::now(),
                    source: self.path.clone(),
                    source_type: self.type_name.clone(),
                    notifier: name.clone(),
                    data: payload.take(),
                })
            });
            a.sub.deliver(event);
        }
    }
}

/// What a filter reads of a payload: its fields by name.
pub(crate) trait PayloadView {
    fn field(&self, name: &str) -> Option<&Value>;
}

impl PayloadView for Value {
    fn field(&self, name: &str) -> Option<&Value> {
        Value::field(self, name)
    }
}

impl<const N: usize> PayloadView for [(&'static str, Value); N] {
    fn field(&self, name: &str) -> Option<&Value> {
        self.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }
}

/// A payload not made yet: made on first look, taken into the event.
trait Payload {
    fn view(&mut self) -> &dyn PayloadView;
    fn take(&mut self) -> Value;
}

/// A payload a closure builds.
struct Built<F>(Option<F>, Option<Value>);

impl<F: FnOnce() -> Value> Payload for Built<F> {
    fn view(&mut self) -> &dyn PayloadView {
        let f = &mut self.0;
        self.1
            .get_or_insert_with(|| f.take().map_or(Value::Bool(false), |f| f()))
    }
    fn take(&mut self) -> Value {
        self.view();
        self.1.take().unwrap_or(Value::Bool(false))
    }
}

/// A payload a closure lists as fields; the map is allocated only by `take`, which hands it
/// to the check (the schema's, in debug builds).
struct Listed<F, C, const N: usize>(Option<F>, Option<[(&'static str, Value); N]>, C);

impl<F, C, const N: usize> Payload for Listed<F, C, N>
where
    F: FnOnce() -> [(&'static str, Value); N],
    C: Fn(&Value),
{
    fn view(&mut self) -> &dyn PayloadView {
        let f = &mut self.0;
        self.1.get_or_insert_with(|| {
            f.take().map_or_else(
                || std::array::from_fn(|_| ("", Value::Bool(false))),
                |f| f(),
            )
        })
    }
    fn take(&mut self) -> Value {
        self.view();
        let value = self.1.take().map_or(Value::Bool(false), Value::map);
        (self.2)(&value);
        value
    }
}

/// A handle on one notifier of one object, for emitting.
///
/// Cheap to clone; holding it does not keep the object alive. Emitting after the object
/// was deleted reaches the subscriptions still attached (none, once they are detached).
#[derive(Clone)]
pub struct Notifier {
    pub(crate) slot: Arc<EventSlot>,
    pub(crate) index: u16,
    pub(crate) decl: Arc<NotifierDecl>,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier")
            .field("object", &self.slot.path)
            .field("name", &self.decl.name)
            .finish()
    }
}

impl Notifier {
    /// Emits an event. `data` builds the payload and runs only if someone listens.
    ///
    /// Never blocks on a subscriber: a full subscription queue drops the event and counts it.
    #[inline]
    pub fn emit(&self, data: impl FnOnce() -> Value) {
        self.slot.emit(self.index, &self.decl.name, || {
            let value = data();
            debug_assert!(
                self.decl.payload.accepts(&value),
                "payload of {}.{} does not match {}: {value}",
                self.slot.path,
                self.decl.name,
                self.decl.payload.type_name()
            );
            value
        });
    }

    /// Emits an event whose payload is a map of `fields`, which runs only if someone listens.
    /// Filters read the fields where they are: an event every filter refuses allocates
    /// nothing, where [`Notifier::emit`] builds the map first. For payloads of a few
    /// fields, numbers, booleans and the like: `tick.emit_fields(|| [("n", Value::UInt(n))])`.
    #[inline]
    pub fn emit_fields<const N: usize>(&self, fields: impl FnOnce() -> [(&'static str, Value); N]) {
        self.slot
            .emit_fields(self.index, &self.decl.name, fields, |value| {
                debug_assert!(
                    self.decl.payload.accepts(value),
                    "payload of {}.{} does not match {}: {value}",
                    self.slot.path,
                    self.decl.name,
                    self.decl.payload.type_name()
                );
            });
    }

    /// True while at least one subscription listens to this notifier.
    pub fn has_subscribers(&self) -> bool {
        self.slot.mask.load(Ordering::Acquire) & mask_bit(self.index) != 0
            && self
                .slot
                .subs
                .read()
                .iter()
                .any(|a| a.index == self.index || a.index == ALL_NOTIFIERS)
    }

    pub fn name(&self) -> &str {
        &self.decl.name
    }

    /// Path of the object the notifier belongs to.
    pub fn object_path(&self) -> &str {
        &self.slot.path
    }
}
