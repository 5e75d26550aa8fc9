//! Subscriptions: per-object or per-type listeners on a notifier, each an object at
//! `/subscriptions/<N>`, owned by a client and delivered through that client's mailbox.
//!
//! A front end holds one [`Subscriber`] per connection (QMP) or per bus connection (D-Bus,
//! labelling each subscription with the caller's unique name). Events wait in the
//! subscriber's mailbox until the front end drains them; each subscription's share of the
//! mailbox is bounded by its `queue-limit`, and an event that does not fit is dropped and
//! counted, so an emitter never waits. For every subscription, at every moment,
//! `matched == delivered + dropped + pending`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::builtin;
use crate::error::{Error, Result};
use crate::notifier::{Event, EventSlot};
use crate::object::{Life, ObjectRef};
use crate::tree::Tree;
use crate::value::Value;

/// Queue limit of a subscription when none is given.
pub const DEFAULT_QUEUE_LIMIT: u32 = 1024;
/// Largest accepted queue limit.
pub const MAX_QUEUE_LIMIT: u32 = 1 << 20;

/// What a subscription listens to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One object, by absolute or partial path.
    Object(String),
    /// Every object of a type or its subtypes, including objects created later.
    Type(String),
}

/// Options of a new subscription.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Most events waiting for delivery; [`DEFAULT_QUEUE_LIMIT`] when `None`.
    pub queue_limit: Option<u64>,
    /// Keep only the newest pending event per source object.
    pub coalesce: bool,
}

/// Whether a subscription targets one object or a type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Object,
    Type,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Object => "object",
            Scope::Type => "type",
        }
    }
}

/// A snapshot of a subscription's counters, taken atomically:
/// `matched == delivered + dropped + pending`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub matched: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub pending: u64,
}

/// A live subscription; the instance of a `subscription` object.
pub struct Subscription {
    id: u64,
    path: Arc<str>,
    scope: Scope,
    /// The target object's canonical path, or the target type's name.
    target: Arc<str>,
    notifier: Arc<str>,
    owner: Arc<str>,
    mailbox: Arc<Mailbox>,
    queue_limit: AtomicU32,
    coalesce: AtomicBool,
    active: AtomicBool,
    // Changed only while the mailbox lock is held; read under it for a consistent snapshot.
    matched: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    pending: AtomicU64,
    /// The objects this subscription is attached to (a leaf lock).
    attached: Mutex<Vec<Weak<EventSlot>>>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("path", &self.path)
            .field("target", &self.target)
            .field("notifier", &self.notifier)
            .field("owner", &self.owner)
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
    pub fn notifier(&self) -> &str {
        &self.notifier
    }
    pub fn owner(&self) -> &str {
        &self.owner
    }
    pub fn queue_limit(&self) -> u32 {
        self.queue_limit.load(Ordering::Relaxed)
    }
    pub fn coalesce(&self) -> bool {
        self.coalesce.load(Ordering::Relaxed)
    }

    /// Changes the queue limit; events already pending stay.
    pub(crate) fn set_queue_limit(&self, limit: u32) {
        self.queue_limit.store(limit, Ordering::Relaxed);
    }

    pub(crate) fn set_coalesce(&self, on: bool) {
        let _mailbox = self.mailbox.state.lock();
        self.coalesce.store(on, Ordering::Relaxed);
    }

    /// The counters, read consistently.
    pub fn counters(&self) -> Counters {
        let _mailbox = self.mailbox.state.lock();
        Counters {
            matched: self.matched.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
        }
    }

    /// A pending event was discarded (superseded, or its subscription or subscriber went
    /// away): it matched but was never delivered, so it counts as dropped. Called with the
    /// mailbox lock held.
    fn count_discarded(&self) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
        self.dropped.fetch_add(1, Ordering::Relaxed);
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

    fn detach_all(&self) {
        let slots = std::mem::take(&mut *self.attached.lock());
        for slot in slots.iter().filter_map(Weak::upgrade) {
            slot.detach(self.id);
        }
    }

    /// Queues an event for delivery, or drops and counts it when the queue is full.
    pub(crate) fn deliver(self: &Arc<Self>, event: &Arc<Event>) {
        let waker = {
            let mut st = self.mailbox.state.lock();
            if st.closed || !self.active.load(Ordering::Relaxed) {
                return;
            }
            self.matched.fetch_add(1, Ordering::Relaxed);
            let coalesce = self.coalesce.load(Ordering::Relaxed);
            if coalesce && let Some(old) = st.latest.remove(&(self.id, event.source.clone())) {
                st.supersede(old, self.id);
            }
            if self.pending.load(Ordering::Relaxed)
                >= u64::from(self.queue_limit.load(Ordering::Relaxed))
            {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let position = st.popped + st.queue.len() as u64;
            st.queue.push_back(Entry {
                sub: self.clone(),
                event: Some(event.clone()),
            });
            self.pending.fetch_add(1, Ordering::Relaxed);
            if coalesce {
                st.latest.insert((self.id, event.source.clone()), position);
            }
            if st.waiting > 0 {
                self.mailbox.cond.notify_all();
            }
            st.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

struct Entry {
    sub: Arc<Subscription>,
    /// `None` once superseded (coalescing) or purged (subscription destroyed).
    event: Option<Arc<Event>>,
}

pub(crate) struct Mailbox {
    id: u64,
    state: Mutex<MailboxState>,
    cond: Condvar,
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
        entry.sub.count_discarded();
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
    ) -> Result<String> {
        let limit = match opts.queue_limit {
            None => DEFAULT_QUEUE_LIMIT,
            Some(l) => u32::try_from(l)
                .ok()
                .filter(|l| (1..=MAX_QUEUE_LIMIT).contains(l))
                .ok_or_else(|| Error::OutOfRange {
                    name: "queue-limit".into(),
                    value: l.to_string(),
                    min: "1".into(),
                    max: MAX_QUEUE_LIMIT.to_string(),
                    type_name: "uint32",
                    full_range: false,
                })?,
        };
        let (scope, target_name, class, object) = match target {
            Target::Object(path) => {
                let obj = self.lookup(path)?;
                (
                    Scope::Object,
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
        // Interfaces do not derive from `object`, but every object implementing one has the
        // notifiers `object` declares.
        let object_class = if class.is_interface() {
            Some(self.types().get(builtin::OBJECT)?)
        } else {
            None
        };
        let found = class
            .notifier(notifier)
            .or_else(|| object_class.as_ref().and_then(|c| c.notifier(notifier)));
        let Some((index, decl)) = found else {
            let typename = class.name().to_owned();
            let property = notifier.to_owned();
            let is_value = class.property(notifier).is_some()
                || object.as_ref().is_some_and(|o| o.child(notifier).is_some());
            return Err(if is_value {
                Error::NotANotifier { typename, property }
            } else {
                Error::PropertyNotFound { typename, property }
            });
        };

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
            notifier: decl.name.clone(),
            owner: owner.into(),
            mailbox: mailbox.clone(),
            queue_limit: AtomicU32::new(limit),
            coalesce: AtomicBool::new(opts.coalesce),
            active: AtomicBool::new(true),
            matched: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            pending: AtomicU64::new(0),
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
                match &object {
                    Some(obj) if obj.core.life() != Life::Live => Err(obj.not_found()),
                    Some(obj) => {
                        sub.attach_to(&obj.core.events, index);
                        Ok(())
                    }
                    None => {
                        for node in st
                            .nodes
                            .values()
                            .filter(|n| n.attached && n.core.class.implements(&sub.target))
                        {
                            if let Some((index, _)) = node.core.class.notifier(notifier) {
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
        Ok(sub.path.to_string())
    }

    /// Stops a destroyed subscription (the `subscription` type's unrealize hook).
    pub(crate) fn detach_subscription(&self, sub: &Arc<Subscription>) {
        sub.active.store(false, Ordering::Relaxed);
        {
            let mut st = self.inner.state.write();
            st.subs.remove(&sub.id);
            if sub.scope == Scope::Type
                && let Some(list) = st.type_subs.get_mut(&sub.target)
            {
                list.retain(|s| s.id != sub.id);
                if list.is_empty() {
                    st.type_subs.remove(&sub.target);
                }
            }
        }
        sub.detach_all();
        sub.mailbox.purge(sub.id);
    }
}

impl Subscriber {
    /// The default owner label of this subscriber's subscriptions.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// Subscribes to `notifier` of a target, owned by this subscriber's label; returns the
    /// new subscription's path.
    ///
    /// # Errors
    /// Unknown path or type, a missing notifier ([`Error::PropertyNotFound`]), a property
    /// that is not a notifier ([`Error::NotANotifier`]), a bad queue limit, or a closed
    /// subscriber.
    pub fn subscribe(
        &self,
        target: Target,
        notifier: &str,
        opts: SubscribeOptions,
    ) -> Result<String> {
        self.tree
            .subscribe(&self.mailbox, &self.owner, &target, notifier, opts)
    }

    /// As [`Subscriber::subscribe`], with another owner label (a D-Bus caller's name).
    ///
    /// # Errors
    /// As [`Subscriber::subscribe`].
    pub fn subscribe_for(
        &self,
        owner: &str,
        target: Target,
        notifier: &str,
        opts: SubscribeOptions,
    ) -> Result<String> {
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
            let path = self.subscribe_for(
                owner,
                Target::Object(obj.path().to_owned()),
                property,
                SubscribeOptions::default(),
            )?;
            return Ok(Value::Path(path));
        }
        obj.get(property)
    }

    /// Destroys one of this subscriber's subscriptions.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::NotASubscription`], or [`Error::NotOwner`] if it
    /// belongs to another client.
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
        if !Arc::ptr_eq(&sub.mailbox, &self.mailbox) || &*sub.owner != owner {
            return Err(Error::NotOwner {
                path: obj.path().to_owned(),
                owner: sub.owner.to_string(),
            });
        }
        self.tree.delete_object(&obj, false)
    }

    /// Paths of this subscriber's live subscriptions (of every owner label).
    pub fn subscriptions(&self) -> Vec<String> {
        self.subscriptions_where(|_| true)
            .into_iter()
            .map(|s| s.path.to_string())
            .collect()
    }

    fn subscriptions_where(&self, keep: impl Fn(&Subscription) -> bool) -> Vec<Arc<Subscription>> {
        let st = self.tree.inner.state.read();
        let mut subs: Vec<_> = st
            .subs
            .values()
            .filter(|s| Arc::ptr_eq(&s.mailbox, &self.mailbox) && keep(s))
            .cloned()
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

    /// Destroys every subscription of `owner` made through this subscriber (a D-Bus peer
    /// that left the bus). Returns how many were destroyed.
    pub fn drop_owner(&self, owner: &str) -> usize {
        self.destroy(self.subscriptions_where(|s| &*s.owner == owner))
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
                    owner: entry.sub.owner.clone(),
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

    /// Destroys every subscription made through this subscriber and discards pending
    /// events. Further subscribes fail with [`Error::SubscriberClosed`].
    pub fn close(&self) {
        let waker = {
            let mut st = self.mailbox.state.lock();
            if st.closed {
                None
            } else {
                st.closed = true;
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
        self.destroy(self.subscriptions_where(|_| true));
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
