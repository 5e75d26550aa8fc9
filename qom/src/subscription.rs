//! Subscriptions: listeners on a notifier (or, with `*`, every notifier) of one object,
//! of every object of a type, or of every object in a subtree; each an object at
//! `/subscriptions/<N>`, owned by a client and delivered through that client's mailbox.
//!
//! A front end holds one [`Subscriber`] per connection (QMP) or per bus connection (D-Bus,
//! labelling each subscription with the caller's unique name). Events wait in the
//! subscriber's mailbox until the front end drains them; each subscription's share of the
//! mailbox is bounded by its `queue-limit`, and an event that does not fit is dropped and
//! counted, so an emitter never waits. An event may be held back instead: superseded by a
//! newer one from the same source (`coalesce`), or waiting out the subscription's
//! `min-interval-ms` (a rate limit per source, the newest event winning); those count as
//! coalesced, not lost. For every subscription, at every moment,
//! `matched == delivered + dropped + pending + coalesced`, and every matched event has the
//! next sequence number of its subscription, so a client sees a gap where events were
//! dropped or coalesced.
//!
//! A subscription made with `linger` outlives its owner's connection by that long: its
//! events wait (up to its queue limit) and a new connection that shows the token returned
//! at subscribe time adopts it ([`Subscriber::adopt`]), receiving what waited, in order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::builtin;
use crate::error::{Error, Result};
use crate::kind::Kind;
use crate::notifier::{ALL_NOTIFIERS, Event, EventSlot, NotifierDecl, PayloadView};
use crate::object::{Life, ObjectRef};
use crate::tree::{Tree, TreeInner};
use crate::types::Class;
use crate::value::Value;

/// Queue limit of a subscription when none is given.
pub const DEFAULT_QUEUE_LIMIT: u32 = 1024;
/// Largest accepted queue limit.
pub const MAX_QUEUE_LIMIT: u32 = 1 << 20;
/// The notifier name that means every notifier of the target.
pub const ALL: &str = "*";
/// Longest rate-limit interval, in milliseconds (an hour).
pub const MAX_MIN_INTERVAL_MS: u64 = 3_600_000;
/// Longest linger, in seconds (a day).
pub const MAX_LINGER_S: u64 = 86_400;

/// What a subscription listens to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One object, by absolute or partial path.
    Object(String),
    /// Every object of a type or its subtypes, including objects created later.
    Type(String),
    /// An object and every object below it, including objects created there later.
    Subtree(String),
}

/// A subscription's checked filter: payload fields and the values they must equal.
type Filter = Box<[(Arc<str>, Value)]>;

/// Options of a new subscription.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscribeOptions {
    /// Most events waiting for delivery; [`DEFAULT_QUEUE_LIMIT`] when `None`.
    pub queue_limit: Option<u64>,
    /// Keep only the newest pending event per source object.
    pub coalesce: bool,
    /// Only events whose payload has each of these fields, equal to the value.
    pub filter: Vec<(String, Value)>,
    /// At most one event per source object in this many milliseconds; the newest one waits
    /// out the interval (1 to [`MAX_MIN_INTERVAL_MS`]).
    pub min_interval_ms: Option<u64>,
    /// Seconds the subscription outlives its owner, waiting to be adopted (1 to
    /// [`MAX_LINGER_S`]).
    pub linger_s: Option<u64>,
}

/// A new subscription: its path, and the token that adopts it (with `linger`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribed {
    pub path: String,
    pub token: Option<String>,
}

/// Whether a subscription targets one object, a type or a subtree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Object,
    Type,
    Subtree,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Object => "object",
            Scope::Type => "type",
            Scope::Subtree => "subtree",
        }
    }
}

/// A snapshot of a subscription's counters, taken atomically:
/// `matched == delivered + dropped + pending + coalesced`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub matched: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub pending: u64,
    pub coalesced: u64,
}

/// Where a subscription's events go.
enum Sink {
    /// Into its owner's mailbox.
    Live(Arc<Mailbox>),
    /// Its owner is gone: kept here, in order with their sequence numbers, until a new
    /// owner adopts the subscription or `until` passes. (Boxed: a live subscription's state
    /// stays small, see [`Subscription`].)
    Parked(Box<Parked>),
}

struct Parked {
    events: VecDeque<(Arc<Event>, u64)>,
    until: Instant,
}

/// A rate-limited subscription's state for one source object.
struct Rate {
    /// When its last event went on (or the time it may next go, when `held` waits).
    last: Instant,
    /// The newest event waiting out the interval.
    held: Option<(Arc<Event>, u64)>,
}

/// A rate-limited subscription's interval and per-source state.
struct RateLimit {
    interval: Duration,
    sources: HashMap<Arc<str>, Rate>,
}

/// What is behind a subscription's own lock (taken before its mailbox's).
struct SubState {
    sink: Sink,
    /// With a rate limit only.
    rate: Option<Box<RateLimit>>,
}

/// A live subscription; the instance of a `subscription` object.
///
/// What a delivery reads and writes comes first and fits one cache line (`repr(C)`, 64-byte
/// aligned): an event for 1000 subscriptions touches 1000 of them (`emit_1000_subscribers`
/// in docs/benchmarks.md).
#[repr(C, align(64))]
pub struct Subscription {
    state: Mutex<SubState>,
    filter: Option<Box<Filter>>,
    // Changed with the subscription's lock or its mailbox's held; `counters` takes both.
    matched: AtomicU64,
    pending: AtomicU64,
    queue_limit: AtomicU32,
    coalesce: AtomicBool,
    active: AtomicBool,
    // The rest is read when the subscription is listed, changed or destroyed.
    delivered: AtomicU64,
    dropped: AtomicU64,
    coalesced: AtomicU64,
    id: u64,
    path: Arc<str>,
    scope: Scope,
    /// The target object's canonical path (the subtree's root), or the target type's name.
    target: Arc<str>,
    /// The notifier's name, or [`ALL`].
    notifier: Arc<str>,
    owner: RwLock<Arc<str>>,
    min_interval: Option<Duration>,
    linger: Option<Duration>,
    token: Option<Box<str>>,
    /// The objects this subscription is attached to (a leaf lock).
    attached: Mutex<Vec<Weak<EventSlot>>>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("path", &self.path)
            .field("target", &self.target)
            .field("notifier", &self.notifier)
            .field("owner", &self.owner())
            .finish()
    }
}

impl Subscription {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
    pub fn path(&self) -> &str {
        &self.path
    }
    pub fn scope(&self) -> Scope {
        self.scope
    }
    pub fn target(&self) -> &str {
        &self.target
    }
    /// The notifier's name, or `*` for every notifier.
    pub fn notifier(&self) -> &str {
        &self.notifier
    }
    /// The owner's label (the last owner's, while it lingers).
    pub fn owner(&self) -> Arc<str> {
        self.owner.read().clone()
    }
    pub fn queue_limit(&self) -> u32 {
        self.queue_limit.load(Ordering::Relaxed)
    }
    pub fn coalesce(&self) -> bool {
        self.coalesce.load(Ordering::Relaxed)
    }
    /// The payload fields an event must have, with their values.
    pub fn filter(&self) -> &[(Arc<str>, Value)] {
        self.filter.as_deref().map_or(&[], |f| f)
    }
    /// The rate limit per source, if any.
    pub fn min_interval(&self) -> Option<Duration> {
        self.min_interval
    }
    /// How long it outlives its owner, if it does.
    pub fn linger(&self) -> Option<Duration> {
        self.linger
    }
    /// True while its owner is gone and it waits to be adopted.
    pub fn is_lingering(&self) -> bool {
        matches!(self.state.lock().sink, Sink::Parked(_))
    }

    /// Changes the queue limit; events already pending stay.
    pub(crate) fn set_queue_limit(&self, limit: u32) {
        self.queue_limit.store(limit, Ordering::Relaxed);
    }

    pub(crate) fn set_coalesce(&self, on: bool) {
        let st = self.state.lock();
        let _mailbox = match &st.sink {
            Sink::Live(mb) => Some(mb.state.lock()),
            Sink::Parked(_) => None,
        };
        self.coalesce.store(on, Ordering::Relaxed);
    }

    /// The counters, read consistently.
    pub fn counters(&self) -> Counters {
        let st = self.state.lock();
        let _mailbox = match &st.sink {
            Sink::Live(mb) => Some(mb.state.lock()),
            Sink::Parked(_) => None,
        };
        Counters {
            matched: self.matched.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
            coalesced: self.coalesced.load(Ordering::Relaxed),
        }
    }

    /// Whether this subscription delivers into `mailbox` now.
    fn delivers_to(&self, mailbox: &Arc<Mailbox>) -> bool {
        matches!(&self.state.lock().sink, Sink::Live(mb) if Arc::ptr_eq(mb, mailbox))
    }

    /// A pending event was discarded (its subscription or subscriber went away): it
    /// matched but was never delivered, so it counts as dropped.
    fn count_discarded(&self) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// A pending event gave way to a newer one from the same source.
    fn count_superseded(&self) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
        self.coalesced.fetch_add(1, Ordering::Relaxed);
    }

    /// Attaches to one object's notifier `index` (called with the tree lock held).
    pub(crate) fn attach_to(self: &Arc<Self>, slot: &Arc<EventSlot>, index: u16) {
        slot.attach(index, self.clone());
        let mut attached = self.attached.lock();
        // Forget objects that are gone, so a long-lived type subscription over many
        // hotplug cycles does not grow.
        if attached.len() >= 16 && attached.len().is_power_of_two() {
            attached.retain(|w| w.strong_count() > 0);
        }
        attached.push(Arc::downgrade(slot));
    }

    /// The notifier index to attach to on an object of `class`, if it has the notifier.
    pub(crate) fn index_on(&self, class: &Class) -> Option<u16> {
        if &*self.notifier == ALL {
            Some(ALL_NOTIFIERS)
        } else {
            class.notifier(&self.notifier).map(|(i, _)| i)
        }
    }

    /// Whether an object at `path` is in this subtree subscription's scope.
    pub(crate) fn covers(&self, path: &str) -> bool {
        self.scope == Scope::Subtree
            && (&*self.target == "/"
                || path == &*self.target
                || path
                    .strip_prefix(&*self.target)
                    .is_some_and(|rest| rest.starts_with('/')))
    }

    fn detach_all(&self) {
        let slots = std::mem::take(&mut *self.attached.lock());
        for slot in slots.iter().filter_map(Weak::upgrade) {
            slot.detach(self.id);
        }
    }

    /// Whether an event's payload passes the filter (checked by the emitter, before it
    /// builds the event).
    #[inline]
    pub(crate) fn passes<P: PayloadView + ?Sized>(&self, data: &P) -> bool {
        self.filter.as_ref().is_none_or(|f| {
            f.iter()
                .all(|(field, want)| data.field(field) == Some(want))
        })
    }

    /// Queues an event that passed the filter for delivery (after the rate limit), or drops
    /// and counts it when the queue is full.
    pub(crate) fn deliver(self: &Arc<Self>, event: &Arc<Event>) {
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        let mut st = self.state.lock();
        if let Sink::Live(mb) = &st.sink
            && mb.closed.load(Ordering::Acquire)
        {
            return;
        }
        // Only ever changed here, under the subscription's lock: no atomic add needed.
        let seq = self.matched.load(Ordering::Relaxed) + 1;
        self.matched.store(seq, Ordering::Relaxed);
        if let Some(limit) = &mut st.rate {
            let now = Instant::now();
            let interval = limit.interval;
            if limit.sources.len() > 64 {
                limit
                    .sources
                    .retain(|_, r| r.held.is_some() || now.duration_since(r.last) < interval);
            }
            let rate = limit.sources.entry(event.source.clone()).or_insert(Rate {
                last: now.checked_sub(interval).unwrap_or(now),
                held: None,
            });
            if rate.held.is_some() || now.duration_since(rate.last) < interval {
                // Too soon after the last: this one waits out the interval, replacing any
                // older one waiting.
                if rate.held.replace((event.clone(), seq)).is_some() {
                    self.coalesced.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.pending.fetch_add(1, Ordering::Relaxed);
                    timer().schedule(
                        rate.last + interval,
                        Job::Release {
                            sub: Arc::downgrade(self),
                            source: event.source.clone(),
                        },
                    );
                }
                return;
            }
            rate.last = now;
        }
        self.enqueue(&mut st, event.clone(), seq, false);
    }

    /// Puts a matched event where the subscription's events go. `counted`: it is already
    /// counted as pending (it was held back by the rate limit).
    fn enqueue(self: &Arc<Self>, st: &mut SubState, event: Arc<Event>, seq: u64, counted: bool) {
        let limit = u64::from(self.queue_limit.load(Ordering::Relaxed));
        let coalesce = self.coalesce.load(Ordering::Relaxed);
        let lost = |sub: &Self| {
            if counted {
                sub.count_discarded();
            } else {
                sub.dropped.fetch_add(1, Ordering::Relaxed);
            }
        };
        match &mut st.sink {
            Sink::Live(mb) => {
                let waker = {
                    let mut mst = mb.state.lock();
                    if mst.closed {
                        lost(self);
                        return;
                    }
                    if coalesce
                        && let Some(old) = mst.latest.remove(&(self.id, event.source.clone()))
                    {
                        mst.supersede(old, self.id);
                    }
                    let waiting = self.pending.load(Ordering::Relaxed) - u64::from(counted);
                    if waiting >= limit {
                        lost(self);
                        return;
                    }
                    let position = mst.popped + mst.queue.len() as u64;
                    if coalesce {
                        mst.latest.insert((self.id, event.source.clone()), position);
                    }
                    mst.queue.push_back(Entry {
                        sub: self.clone(),
                        event: Some(event),
                        seq,
                    });
                    if !counted {
                        self.pending.fetch_add(1, Ordering::Relaxed);
                    }
                    if mst.waiting > 0 {
                        mb.cond.notify_all();
                    }
                    mst.waker.take()
                };
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            Sink::Parked(parked) => {
                let events = &mut parked.events;
                if coalesce
                    && let Some(i) = events.iter().rposition(|(e, _)| e.source == event.source)
                {
                    events.remove(i);
                    self.count_superseded();
                }
                let waiting = self.pending.load(Ordering::Relaxed) - u64::from(counted);
                if waiting >= limit {
                    lost(self);
                    return;
                }
                events.push_back((event, seq));
                if !counted {
                    self.pending.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The rate limit's interval for `source` is over: its held event, if any, goes on.
    fn release(self: &Arc<Self>, source: &Arc<str>) {
        let mut st = self.state.lock();
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        let Some(held) = st
            .rate
            .as_mut()
            .and_then(|l| l.sources.get_mut(source))
            .and_then(|r| {
                r.last = Instant::now();
                r.held.take()
            })
        else {
            return;
        };
        self.enqueue(&mut st, held.0, held.1, true);
    }

    /// The owner is gone: with `linger`, the pending events leave its mailbox for the
    /// subscription's own keeping until it is adopted or the linger runs out. False (and
    /// nothing done) without `linger`.
    fn park(self: &Arc<Self>, tree: &Tree) -> bool {
        let Some(linger) = self.linger else {
            return false;
        };
        let mut st = self.state.lock();
        let Sink::Live(mb) = &st.sink else {
            return true;
        };
        let mut events = VecDeque::new();
        {
            let mut mst = mb.state.lock();
            let mut moved = 0;
            for e in mst.queue.iter_mut().filter(|e| e.sub.id == self.id) {
                if let Some(event) = e.event.take() {
                    events.push_back((event, e.seq));
                    moved += 1;
                }
            }
            if moved > 0 {
                mst.tombstones += moved;
                mst.compact();
            }
        }
        let until = Instant::now() + linger;
        st.sink = Sink::Parked(Box::new(Parked { events, until }));
        timer().schedule(
            until,
            Job::Expire {
                sub: Arc::downgrade(self),
                tree: Arc::downgrade(&tree.inner),
            },
        );
        true
    }

    /// Whether the linger ran out without an adoption (the subscription is then deleted).
    fn expired(&self) -> bool {
        matches!(&self.state.lock().sink, Sink::Parked(p) if p.until <= Instant::now())
    }

    /// Discards everything pending (the subscription is being destroyed).
    fn discard_pending(&self) {
        let mut st = self.state.lock();
        if let Some(limit) = &mut st.rate {
            for rate in limit.sources.values_mut() {
                if rate.held.take().is_some() {
                    self.count_discarded();
                }
            }
        }
        match &mut st.sink {
            Sink::Live(mb) => mb.purge(self.id),
            Sink::Parked(parked) => {
                for _ in parked.events.drain(..) {
                    self.count_discarded();
                }
            }
        }
    }
}

struct Entry {
    sub: Arc<Subscription>,
    /// `None` once superseded (coalescing), purged (subscription destroyed) or moved out
    /// (its owner went, the subscription lingers).
    event: Option<Arc<Event>>,
    /// The event's sequence number in its subscription.
    seq: u64,
}

pub(crate) struct Mailbox {
    id: u64,
    state: Mutex<MailboxState>,
    cond: Condvar,
    /// Mirrors `state.closed`, for a check without the lock.
    closed: AtomicBool,
}

#[derive(Default)]
struct MailboxState {
    queue: VecDeque<Entry>,
    /// Number of entries ever removed from the front: `queue[i]` is at position `popped + i`.
    popped: u64,
    tombstones: usize,
    /// Position of the newest pending event per (coalescing subscription, source).
    latest: HashMap<(u64, Arc<str>), u64>,
    waker: Option<Waker>,
    waiting: usize,
    closed: bool,
}

impl MailboxState {
    fn has_events(&self) -> bool {
        self.queue.len() > self.tombstones
    }

    /// Turns the pending event at `position` (of subscription `sub_id`) into a tombstone.
    fn supersede(&mut self, position: u64, sub_id: u64) {
        let Some(index) = position.checked_sub(self.popped) else {
            return;
        };
        let Some(entry) = usize::try_from(index)
            .ok()
            .and_then(|i| self.queue.get_mut(i))
        else {
            return;
        };
        if entry.sub.id != sub_id || entry.event.take().is_none() {
            return;
        }
        entry.sub.count_superseded();
        self.tombstones += 1;
        if self.tombstones > 32 && self.tombstones * 2 > self.queue.len() {
            self.compact();
        }
    }

    /// Removes tombstones; positions change, so the coalescing index is rebuilt.
    fn compact(&mut self) {
        self.queue.retain(|e| e.event.is_some());
        self.popped = 0;
        self.tombstones = 0;
        self.latest.clear();
        for (i, e) in self.queue.iter().enumerate() {
            if let (true, Some(ev)) = (e.sub.coalesce.load(Ordering::Relaxed), &e.event) {
                self.latest.insert((e.sub.id, ev.source.clone()), i as u64);
            }
        }
    }
}

impl Mailbox {
    /// Discards a destroyed subscription's pending events, counting them as dropped.
    fn purge(&self, sub_id: u64) {
        let mut st = self.state.lock();
        let mut purged = 0;
        for e in st.queue.iter_mut().filter(|e| e.sub.id == sub_id) {
            if e.event.take().is_some() {
                e.sub.count_discarded();
            }
            purged += 1;
        }
        if purged > 0 {
            st.tombstones += purged;
            st.compact();
        }
    }
}

/// One event as a front end receives it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Path of the subscription that matched.
    pub subscription: Arc<str>,
    /// The subscription's owner label.
    pub owner: Arc<str>,
    /// The event's number in its subscription: 1, 2, 3, ... for the events it matched; a
    /// gap is events dropped or coalesced (its counters say which).
    pub sequence: u64,
    pub event: Arc<Event>,
}

/// A client's handle for subscribing and receiving events. Dropping it (or
/// [`Subscriber::close`]) destroys every subscription made through it.
pub struct Subscriber {
    tree: Tree,
    mailbox: Arc<Mailbox>,
    owner: Arc<str>,
}

impl fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber")
            .field("owner", &self.owner)
            .finish()
    }
}

impl Tree {
    /// A new subscriber whose subscriptions show `owner` (e.g. `qmp:3`) unless made with
    /// an explicit owner label.
    pub fn subscriber(&self, owner: &str) -> Subscriber {
        let id = self.inner.next_mailbox.fetch_add(1, Ordering::Relaxed);
        Subscriber {
            tree: self.clone(),
            mailbox: Arc::new(Mailbox {
                id,
                state: Mutex::new(MailboxState::default()),
                cond: Condvar::new(),
                closed: AtomicBool::new(false),
            }),
            owner: owner.into(),
        }
    }

    /// Every subscription's path, in creation order.
    pub fn subscriptions(&self) -> Vec<String> {
        let st = self.inner.state.read();
        let mut subs: Vec<_> = st
            .subs
            .values()
            .map(|s| (s.id, s.path.to_string()))
            .collect();
        subs.sort_unstable();
        subs.into_iter().map(|(_, p)| p).collect()
    }

    fn subscribe(
        &self,
        mailbox: &Arc<Mailbox>,
        owner: &str,
        target: &Target,
        notifier: &str,
        opts: SubscribeOptions,
    ) -> Result<Subscribed> {
        let limit = match opts.queue_limit {
            None => DEFAULT_QUEUE_LIMIT,
            Some(l) => u32::try_from(l)
                .ok()
                .filter(|l| (1..=MAX_QUEUE_LIMIT).contains(l))
                .ok_or_else(|| out_of_range("queue-limit", l, MAX_QUEUE_LIMIT.into()))?,
        };
        let min_interval = opts
            .min_interval_ms
            .map(|ms| match ms {
                1..=MAX_MIN_INTERVAL_MS => Ok(Duration::from_millis(ms)),
                _ => Err(out_of_range("min-interval-ms", ms, MAX_MIN_INTERVAL_MS)),
            })
            .transpose()?;
        let linger = opts
            .linger_s
            .map(|s| match s {
                1..=MAX_LINGER_S => Ok(Duration::from_secs(s)),
                _ => Err(out_of_range("linger", s, MAX_LINGER_S)),
            })
            .transpose()?;
        let (scope, target_name, class, object) = match target {
            Target::Object(path) | Target::Subtree(path) => {
                let obj = self.lookup(path)?;
                let scope = if matches!(target, Target::Object(_)) {
                    Scope::Object
                } else {
                    Scope::Subtree
                };
                (
                    scope,
                    Arc::<str>::from(obj.path()),
                    obj.class().clone(),
                    Some(obj),
                )
            }
            Target::Type(name) => (
                Scope::Type,
                Arc::<str>::from(name.as_str()),
                self.types().get(name)?,
                None,
            ),
        };
        // The notifiers the subscription can match: its target class's (an interface's
        // objects have `object`'s too); for a subtree, any registered type's, as objects of
        // any type may be created in it.
        let candidates: Vec<Arc<NotifierDecl>> = match scope {
            Scope::Subtree => self
                .types()
                .classes()
                .iter()
                .flat_map(|c| c.notifiers().iter().map(|n| n.item.clone()))
                .collect(),
            _ => {
                let mut decls: Vec<_> = class.notifiers().iter().map(|n| n.item.clone()).collect();
                if class.is_interface() {
                    let object_class = self.types().get(builtin::OBJECT)?;
                    decls.extend(object_class.notifiers().iter().map(|n| n.item.clone()));
                }
                decls
            }
        };
        let matching: Vec<Arc<NotifierDecl>> = candidates
            .into_iter()
            .filter(|d| notifier == ALL || *d.name == *notifier)
            .collect();
        let notifier_name: Arc<str> = match matching.first() {
            _ if notifier == ALL => ALL.into(),
            Some(d) => d.name.clone(),
            None => {
                let typename = class.name().to_owned();
                let property = notifier.to_owned();
                let is_value = class.property(notifier).is_some()
                    || object.as_ref().is_some_and(|o| o.child(notifier).is_some());
                return Err(if is_value {
                    Error::NotANotifier { typename, property }
                } else {
                    Error::PropertyNotFound { typename, property }
                });
            }
        };
        let filter = check_filter(&matching, notifier, opts.filter)?;
        let token = linger.map(|_| new_token()).transpose()?;

        let sub_class = self.types().get(builtin::SUBSCRIPTION)?;
        let container = self.lookup("/subscriptions")?;
        let id = {
            let mut st = self.inner.state.write();
            st.next_sub_id += 1;
            st.next_sub_id
        };
        let sub = Arc::new(Subscription {
            id,
            path: format!("/subscriptions/{id}").into(),
            scope,
            target: target_name,
            notifier: notifier_name,
            owner: RwLock::new(owner.into()),
            state: Mutex::new(SubState {
                sink: Sink::Live(mailbox.clone()),
                rate: min_interval.map(|interval| {
                    Box::new(RateLimit {
                        interval,
                        sources: HashMap::new(),
                    })
                }),
            }),
            queue_limit: AtomicU32::new(limit),
            coalesce: AtomicBool::new(opts.coalesce),
            active: AtomicBool::new(true),
            filter: (!filter.is_empty()).then(|| Box::new(filter)),
            min_interval,
            linger,
            token: token.clone().map(String::into_boxed_str),
            matched: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            attached: Mutex::new(Vec::new()),
        });
        // The object appears first (its counters at zero); the subscription starts
        // matching events once attached below.
        let sub_obj = self.create_object(
            &container,
            &id.to_string(),
            sub_class,
            Some(sub.clone()),
            Vec::new(),
        )?;
        let attached = {
            let mut st = self.inner.state.write();
            let closed = mailbox.state.lock().closed;
            if closed {
                Err(Error::SubscriberClosed)
            } else if sub_obj.core.life() != Life::Live {
                Err(sub_obj.not_found())
            } else {
                match (&object, scope) {
                    (Some(obj), _) if obj.core.life() != Life::Live => Err(obj.not_found()),
                    (Some(obj), Scope::Object) => {
                        if let Some(index) = sub.index_on(obj.class()) {
                            sub.attach_to(&obj.core.events, index);
                        }
                        Ok(())
                    }
                    (_, Scope::Subtree) => {
                        for node in st
                            .nodes
                            .values()
                            .filter(|n| n.attached && sub.covers(n.core.path()))
                        {
                            if let Some(index) = sub.index_on(&node.core.class) {
                                sub.attach_to(&node.core.events, index);
                            }
                        }
                        st.subtree_subs.push(sub.clone());
                        Ok(())
                    }
                    _ => {
                        for node in st
                            .nodes
                            .values()
                            .filter(|n| n.attached && n.core.class.implements(&sub.target))
                        {
                            if let Some(index) = sub.index_on(&node.core.class) {
                                sub.attach_to(&node.core.events, index);
                            }
                        }
                        st.type_subs
                            .entry(sub.target.clone())
                            .or_default()
                            .push(sub.clone());
                        Ok(())
                    }
                }
                .map(|()| {
                    st.subs.insert(id, sub.clone());
                })
            }
        };
        if let Err(e) = attached {
            let _ = self.delete_object(&sub_obj, false);
            return Err(e);
        }
        Ok(Subscribed {
            path: sub.path.to_string(),
            token,
        })
    }

    /// Stops a destroyed subscription (the `subscription` type's unrealize hook).
    pub(crate) fn detach_subscription(&self, sub: &Arc<Subscription>) {
        sub.active.store(false, Ordering::Relaxed);
        {
            let mut st = self.inner.state.write();
            st.subs.remove(&sub.id);
            match sub.scope {
                Scope::Type => {
                    if let Some(list) = st.type_subs.get_mut(&sub.target) {
                        list.retain(|s| s.id != sub.id);
                        if list.is_empty() {
                            st.type_subs.remove(&sub.target);
                        }
                    }
                }
                Scope::Subtree => st.subtree_subs.retain(|s| s.id != sub.id),
                Scope::Object => {}
            }
        }
        sub.detach_all();
        sub.discard_pending();
    }
}

fn out_of_range(name: &str, value: u64, max: u64) -> Error {
    Error::OutOfRange {
        name: name.into(),
        value: value.to_string(),
        min: "1".into(),
        max: max.to_string(),
        type_name: "uint64",
        full_range: false,
    }
}

/// Checks a filter against the payloads of the notifiers it can match: each field must be
/// in at least one of them, its value of that field's kind (made canonical by it: `"running"`
/// becomes the enum value a payload holds).
fn check_filter(
    decls: &[Arc<NotifierDecl>],
    notifier: &str,
    filter: Vec<(String, Value)>,
) -> Result<Filter> {
    let mut out = Vec::with_capacity(filter.len());
    for (field, value) in filter {
        let mut refused = None;
        let mut found = None;
        for decl in decls {
            let Kind::Struct(payload) = decl.payload() else {
                continue;
            };
            let Some(f) = payload.fields.iter().find(|f| f.name == field) else {
                continue;
            };
            // Named as the option is, so that a type error says where it is.
            match f.kind.check(&format!("filter.{field}"), value.clone()) {
                Ok(v) => {
                    found = Some(v);
                    break;
                }
                Err(e) => refused = Some(e),
            }
        }
        match (found, refused) {
            (Some(v), _) => out.push((Arc::<str>::from(field), v)),
            (None, Some(e)) => return Err(e),
            (None, None) => {
                let mut fields: Vec<&str> = decls
                    .iter()
                    .filter_map(|d| match d.payload() {
                        Kind::Struct(p) => Some(p.fields.iter().map(|f| f.name.as_str())),
                        _ => None,
                    })
                    .flatten()
                    .collect();
                fields.sort_unstable();
                fields.dedup();
                return Err(Error::NoFilterField {
                    notifier: notifier.to_owned(),
                    field,
                    fields: if fields.is_empty() {
                        "none".into()
                    } else {
                        fields.join(", ")
                    },
                });
            }
        }
    }
    Ok(out.into_boxed_slice())
}

/// A token that adopts a lingering subscription: 128 random bits, as hex.
fn new_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::failed(format!("no random bytes for a subscription token: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares two tokens in time independent of where they differ.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Subscriber {
    /// The default owner label of this subscriber's subscriptions.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// Subscribes to `notifier` (or [`ALL`]) of a target, owned by this subscriber's label;
    /// returns the new subscription's path. (With `linger`, use
    /// [`Subscriber::subscribe_full`]: its token is what adopts the subscription.)
    ///
    /// # Errors
    /// Unknown path or type, a missing notifier ([`Error::PropertyNotFound`]), a property
    /// that is not a notifier ([`Error::NotANotifier`]), a filter on a field no matching
    /// payload has ([`Error::NoFilterField`]) or of the wrong kind, an option out of range,
    /// or a closed subscriber.
    pub fn subscribe(
        &self,
        target: Target,
        notifier: &str,
        opts: SubscribeOptions,
    ) -> Result<String> {
        self.subscribe_full(target, notifier, opts).map(|s| s.path)
    }

    /// As [`Subscriber::subscribe`]; also returns the adoption token of a subscription
    /// made with `linger`.
    ///
    /// # Errors
    /// As [`Subscriber::subscribe`].
    pub fn subscribe_full(
        &self,
        target: Target,
        notifier: &str,
        opts: SubscribeOptions,
    ) -> Result<Subscribed> {
        self.tree
            .subscribe(&self.mailbox, &self.owner, &target, notifier, opts)
    }

    /// As [`Subscriber::subscribe_full`], with another owner label (a D-Bus caller's name).
    ///
    /// # Errors
    /// As [`Subscriber::subscribe`].
    pub fn subscribe_for(
        &self,
        owner: &str,
        target: Target,
        notifier: &str,
        opts: SubscribeOptions,
    ) -> Result<Subscribed> {
        self.tree
            .subscribe(&self.mailbox, owner, &target, notifier, opts)
    }

    /// Reads a property; reading a notifier subscribes to it and returns the subscription's
    /// path (QEMU's 2012 proposal).
    ///
    /// # Errors
    /// As [`Tree::get`] and [`Subscriber::subscribe`].
    pub fn get(&self, path: &str, property: &str) -> Result<Value> {
        self.get_for(&self.owner.clone(), path, property)
    }

    /// As [`Subscriber::get`], with another owner label.
    ///
    /// # Errors
    /// As [`Subscriber::get`].
    pub fn get_for(&self, owner: &str, path: &str, property: &str) -> Result<Value> {
        let obj = self.tree.lookup(path)?;
        if obj.class().notifier(property).is_some() {
            let sub = self.subscribe_for(
                owner,
                Target::Object(obj.path().to_owned()),
                property,
                SubscribeOptions::default(),
            )?;
            return Ok(Value::Path(sub.path));
        }
        obj.get(property)
    }

    /// Destroys one of this subscriber's subscriptions.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::NotASubscription`], or [`Error::NotOwner`] if it
    /// belongs to another client (or waits to be adopted).
    pub fn unsubscribe(&self, path: &str) -> Result<()> {
        self.unsubscribe_for(&self.owner.clone(), path)
    }

    /// As [`Subscriber::unsubscribe`], for a subscription made with an owner label.
    ///
    /// # Errors
    /// As [`Subscriber::unsubscribe`].
    pub fn unsubscribe_for(&self, owner: &str, path: &str) -> Result<()> {
        let obj = self.tree.lookup(path)?;
        let sub = subscription_of(&obj)?;
        if !sub.delivers_to(&self.mailbox) || &*sub.owner() != owner {
            return Err(Error::NotOwner {
                path: obj.path().to_owned(),
                owner: sub.owner().to_string(),
            });
        }
        self.tree.delete_object(&obj, false)
    }

    /// Takes over a subscription whose owner went while it lingers, showing the token its
    /// subscribe returned: it becomes this subscriber's (owned by its label), and the
    /// events that waited are delivered first, in order.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::NotASubscription`], [`Error::NotAdoptable`] (not
    /// lingering, or another token), or [`Error::SubscriberClosed`].
    pub fn adopt(&self, path: &str, token: &str) -> Result<String> {
        self.adopt_for(&self.owner.clone(), path, token)
    }

    /// As [`Subscriber::adopt`], with another owner label.
    ///
    /// # Errors
    /// As [`Subscriber::adopt`].
    pub fn adopt_for(&self, owner: &str, path: &str, token: &str) -> Result<String> {
        let obj = self.tree.lookup(path)?;
        let sub = subscription_of(&obj)?;
        let refused = || Error::NotAdoptable {
            path: obj.path().to_owned(),
        };
        let mut st = sub.state.lock();
        let Sink::Parked(parked) = &mut st.sink else {
            return Err(refused());
        };
        if !sub.token.as_deref().is_some_and(|t| same_token(t, token)) {
            return Err(refused());
        }
        let events = std::mem::take(&mut parked.events);
        let waker = {
            let mut mst = self.mailbox.state.lock();
            if mst.closed {
                // Still parked, still adoptable by someone else.
                if let Sink::Parked(parked) = &mut st.sink {
                    parked.events = events;
                }
                return Err(Error::SubscriberClosed);
            }
            let coalesce = sub.coalesce.load(Ordering::Relaxed);
            for (event, seq) in events {
                let position = mst.popped + mst.queue.len() as u64;
                if coalesce {
                    mst.latest.insert((sub.id, event.source.clone()), position);
                }
                mst.queue.push_back(Entry {
                    sub: sub.clone(),
                    event: Some(event),
                    seq,
                });
            }
            if mst.waiting > 0 {
                self.mailbox.cond.notify_all();
            }
            mst.waker.take()
        };
        st.sink = Sink::Live(self.mailbox.clone());
        *sub.owner.write() = owner.into();
        drop(st);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(sub.path.to_string())
    }

    /// Paths of this subscriber's live subscriptions (of every owner label).
    pub fn subscriptions(&self) -> Vec<String> {
        self.subscriptions_where(|_| true)
            .into_iter()
            .map(|s| s.path.to_string())
            .collect()
    }

    fn subscriptions_where(&self, keep: impl Fn(&Subscription) -> bool) -> Vec<Arc<Subscription>> {
        let subs: Vec<_> = self
            .tree
            .inner
            .state
            .read()
            .subs
            .values()
            .cloned()
            .collect();
        let mut subs: Vec<_> = subs
            .into_iter()
            .filter(|s| s.delivers_to(&self.mailbox) && keep(s))
            .collect();
        subs.sort_unstable_by_key(|s| s.id);
        subs
    }

    fn destroy(&self, subs: Vec<Arc<Subscription>>) -> usize {
        let mut n = 0;
        for sub in subs {
            if let Ok(obj) = self.tree.lookup(&sub.path)
                && self.tree.delete_object(&obj, false).is_ok()
            {
                n += 1;
            }
        }
        n
    }

    /// The owner of `subs` is gone: those made with `linger` wait to be adopted, the rest
    /// are destroyed. Returns how many were destroyed.
    fn owner_gone(&self, subs: Vec<Arc<Subscription>>) -> usize {
        let doomed = subs.into_iter().filter(|s| !s.park(&self.tree)).collect();
        self.destroy(doomed)
    }

    /// Every subscription of `owner` made through this subscriber (a D-Bus peer that left
    /// the bus) is destroyed, or, made with `linger`, waits to be adopted. Returns how many
    /// were destroyed.
    pub fn drop_owner(&self, owner: &str) -> usize {
        self.owner_gone(self.subscriptions_where(|s| &*s.owner() == owner))
    }

    /// Takes every pending event, oldest first.
    pub fn drain(&self) -> Vec<Delivery> {
        let mut st = self.mailbox.state.lock();
        let queue = std::mem::take(&mut st.queue);
        st.popped += queue.len() as u64;
        st.tombstones = 0;
        st.latest.clear();
        let mut out = Vec::with_capacity(queue.len());
        for entry in queue {
            if let Some(event) = entry.event {
                entry.sub.pending.fetch_sub(1, Ordering::Relaxed);
                entry.sub.delivered.fetch_add(1, Ordering::Relaxed);
                out.push(Delivery {
                    subscription: entry.sub.path.clone(),
                    owner: entry.sub.owner(),
                    sequence: entry.seq,
                    event,
                });
            }
        }
        out
    }

    /// True if events are waiting.
    pub fn has_pending(&self) -> bool {
        self.mailbox.state.lock().has_events()
    }

    /// Blocks until events are waiting, the subscriber is closed, or `timeout` passes.
    /// Returns true if events are waiting.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.mailbox.state.lock();
        while !st.has_events() && !st.closed {
            st.waiting += 1;
            let timed_out = self.mailbox.cond.wait_until(&mut st, deadline).timed_out();
            st.waiting -= 1;
            if timed_out {
                break;
            }
        }
        st.has_events()
    }

    /// A future that completes when events are waiting or the subscriber is closed.
    pub fn ready(&self) -> Ready<'_> {
        Ready {
            mailbox: &self.mailbox,
        }
    }

    /// Ends the subscriber: subscriptions made with `linger` wait to be adopted (their
    /// pending events with them), the others are destroyed with their pending events.
    /// Further subscribes fail with [`Error::SubscriberClosed`].
    pub fn close(&self) {
        let subs = self.subscriptions_where(|_| true);
        let (lingering, doomed): (Vec<_>, Vec<_>) =
            subs.into_iter().partition(|s| s.park(&self.tree));
        drop(lingering);
        let waker = {
            let mut st = self.mailbox.state.lock();
            if st.closed {
                None
            } else {
                st.closed = true;
                self.mailbox.closed.store(true, Ordering::Release);
                for entry in std::mem::take(&mut st.queue) {
                    if entry.event.is_some() {
                        entry.sub.count_discarded();
                    }
                }
                st.latest.clear();
                st.tombstones = 0;
                self.mailbox.cond.notify_all();
                st.waker.take()
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
        self.destroy(doomed);
    }

    /// An identifier of this subscriber, unique in the process.
    pub fn id(&self) -> u64 {
        self.mailbox.id
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.close();
    }
}

/// Work the timer thread does when its time comes.
enum Job {
    /// A rate-limited subscription's interval for `source` is over.
    Release {
        sub: Weak<Subscription>,
        source: Arc<str>,
    },
    /// A lingering subscription's time to be adopted may be over.
    Expire {
        sub: Weak<Subscription>,
        tree: Weak<TreeInner>,
    },
}

impl Job {
    fn run(self) {
        match self {
            Job::Release { sub, source } => {
                if let Some(sub) = sub.upgrade() {
                    sub.release(&source);
                }
            }
            Job::Expire { sub, tree } => {
                let (Some(sub), Some(inner)) = (sub.upgrade(), tree.upgrade()) else {
                    return;
                };
                if sub.expired() {
                    let tree = Tree { inner };
                    if let Ok(obj) = tree.lookup(&sub.path) {
                        let _ = tree.delete_object(&obj, false);
                    }
                }
            }
        }
    }
}

/// One thread for every subscription's timed work (rate limits, lingers), started on first
/// use: an emitter never waits, so nothing timed can run on the emitting thread.
struct Timer {
    jobs: Mutex<BTreeMap<(Instant, u64), Job>>,
    changed: Condvar,
    next: AtomicU64,
}

fn timer() -> &'static Timer {
    static TIMER: std::sync::OnceLock<&'static Timer> = std::sync::OnceLock::new();
    TIMER.get_or_init(|| {
        let timer: &'static Timer = Box::leak(Box::new(Timer {
            jobs: Mutex::new(BTreeMap::new()),
            changed: Condvar::new(),
            next: AtomicU64::new(0),
        }));
        if let Err(e) = sandbox::spawn(sandbox::Class::Timer, "qom-timer".into(), move || {
            timer.run()
        }) {
            // Without it, held events wait for the next event of their source and lingering
            // subscriptions stay until their subscriber is dropped: degraded, not broken.
            tracing::error!("qom: cannot start the subscription timer thread: {e}");
        }
        timer
    })
}

impl Timer {
    fn schedule(&self, at: Instant, job: Job) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut jobs = self.jobs.lock();
        let first = jobs.keys().next().is_none_or(|k| (at, n) < *k);
        jobs.insert((at, n), job);
        if first {
            self.changed.notify_one();
        }
    }

    fn run(&self) {
        let mut jobs = self.jobs.lock();
        loop {
            let now = Instant::now();
            match jobs.keys().next().copied() {
                Some(key) if key.0 <= now => {
                    let job = jobs.remove(&key);
                    drop(jobs);
                    if let Some(job) = job {
                        job.run();
                    }
                    jobs = self.jobs.lock();
                }
                Some((at, _)) => {
                    self.changed.wait_until(&mut jobs, at);
                }
                None => self.changed.wait(&mut jobs),
            }
        }
    }
}

/// Future of [`Subscriber::ready`].
pub struct Ready<'a> {
    mailbox: &'a Mailbox,
}

impl Future for Ready<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.mailbox.state.lock();
        if st.has_events() || st.closed {
            Poll::Ready(())
        } else {
            match &mut st.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        }
    }
}

/// The subscription behind a `subscription` object.
///
/// # Errors
/// [`Error::NotASubscription`].
pub fn subscription_of(obj: &ObjectRef) -> Result<Arc<Subscription>> {
    obj.instance::<Subscription>()
        .ok_or_else(|| Error::NotASubscription {
            path: obj.path().to_owned(),
        })
}
