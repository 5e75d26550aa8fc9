//! Callers' lanes: every method call is answered off the bridge's executor thread, in the
//! order its caller sent it, and no caller waits for another.
//!
//! The executor thread reads every connection's messages and sends every reply and signal;
//! it never calls the tree, whose getters, setters and actions may take locks that long
//! work holds (a save holds the machine's for seconds). Each caller (a unique name on the
//! bus, or a peer-to-peer connection's label) has a lane: a queue of its calls, served one
//! at a time by a task that runs each call's tree work on the blocking pool
//! (`zruntime::unblock`) and sends the reply. A caller's calls are thus answered in order
//! (a `Set` is done before the `Get` sent after it), its leaving drops its subscriptions
//! only after every call it made before (a `Subscribe` cannot outlive its owner), and a call
//! that waits holds up nobody else: every other caller's lane goes on, `Peer.Ping` included.
//! Actions are answered out of order, as before: a slow one (`pmemsave`) goes on the pool
//! on its own, so its caller's next calls need not wait for it.
//!
//! A lane ends when it is empty and is made again at the caller's next call; the map of
//! lanes therefore holds only callers with work queued.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use zbus::Message;
use zbus::message::Flags;
use zruntime::mpmc::{Receiver, Sender, unbounded};

use super::bridge::{Bridge, Peer};
use super::error::DbusError;

/// Most calls one caller may have queued; more are refused with `LimitsExceeded` until its
/// lane catches up, so a flooding client cannot grow the bridge's memory without bound.
pub const MAX_QUEUED_CALLS: usize = 1024;

/// What a lane serves.
pub enum Work {
    /// A method call, answered on the connection it came from.
    Call { peer: Peer, msg: Message },
    /// The caller left the bus or closed its connection: its subscriptions go.
    Left,
}

/// The lanes of the callers that have work queued.
#[derive(Default)]
pub struct Lanes {
    queues: Mutex<HashMap<String, Sender<Work>>>,
}

impl Lanes {
    /// Calls and departures queued or being served, in every lane.
    pub fn busy(&self) -> bool {
        !self.queues.lock().is_empty()
    }
}

impl Bridge {
    /// Queues `work` in `caller`'s lane, making the lane if it has none. Never waits.
    pub fn enqueue(self: &Arc<Self>, caller: String, work: Work) {
        let mut queues = self.lanes.queues.lock();
        if let Some(queue) = queues.get(&caller) {
            if let Work::Call { peer, msg } = &work
                && queue.len() >= MAX_QUEUED_CALLS
            {
                zruntime::spawn(refuse_flood(peer.clone(), msg.clone(), caller)).detach();
                return;
            }
            // The map holds the lane's sender and its task removes it before ending, so
            // the lane is open.
            let _ = queue.try_send(work);
            return;
        }
        let (queue, lane) = unbounded();
        let _ = queue.try_send(work);
        queues.insert(caller.clone(), queue);
        drop(queues);
        zruntime::spawn(self.clone().serve_lane(caller, lane)).detach();
    }

    /// Serves a lane's work in order until it is empty.
    async fn serve_lane(self: Arc<Self>, caller: String, lane: Receiver<Work>) {
        loop {
            let work = match lane.try_recv() {
                Ok(work) => work,
                Err(_) => {
                    // Empty: end, unless work came meanwhile (it is queued under this lock).
                    let mut queues = self.lanes.queues.lock();
                    match lane.try_recv() {
                        Ok(work) => work,
                        Err(_) => {
                            queues.remove(&caller);
                            return;
                        }
                    }
                }
            };
            match work {
                Work::Call { peer, msg } => self.answer(&peer, msg).await,
                Work::Left => {
                    let bridge = self.clone();
                    let owner = caller.clone();
                    let n = zruntime::unblock(move || bridge.events.drop_owner(&owner)).await;
                    if n > 0 {
                        tracing::debug!("D-Bus: {caller} left; dropped its {n} subscriptions");
                    }
                }
            }
        }
    }
}

/// Tells a caller whose lane is full that its call was not taken.
async fn refuse_flood(peer: Peer, msg: Message, caller: String) {
    let hdr = msg.header();
    if hdr.primary().flags().contains(Flags::NO_REPLY_EXPECTED) {
        return;
    }
    let e = DbusError::new(
        "org.freedesktop.DBus.Error.LimitsExceeded",
        format!("{caller} has {MAX_QUEUED_CALLS} calls waiting for an answer; try again later"),
    );
    super::bridge::send_reply(&peer.conn, &hdr, Err(e)).await;
}
