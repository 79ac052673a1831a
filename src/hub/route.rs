//! Routing: Command and Echo to every shim a pattern names, CommandResponse back to the
//! Command's sender, and Who.
//!
//! Each request is checked against the sender's rates first (`send.rs`), matched through
//! the identity trie (`router.rs`), and every frame it produces goes out through
//! [`Hub::send`]. The sender always gets exactly one answer per Command, Echo and Who:
//! an Ack, or an Error saying why not.

use super::Hub;
use super::send::{Effects, Route, Via, Work};
use super::shim::{Shim, serial_of_command_id};
use crate::metrics::{Counters, Transport};
use crate::proto::cluster::Routed as ToNode;
use crate::proto::reject::Reject;
use crate::proto::request::Routed;
use crate::proto::target::Target;
use crate::proto::{Opcode, reply};
use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tracing::debug;

impl Hub {
    /// A Command or Echo from `sender` to the shims `target` names.
    pub(crate) fn fan_out(&self, sender: &Arc<Shim>, r: &Routed<'_>, via: Via, out: &mut Effects) {
        let Routed {
            op,
            ref target,
            target_text,
            text,
        } = *r;
        let answer = Route::Reply(via);
        if let Err(r) = self.allow_route(sender, Work::FanOut, out.now_ms) {
            return self.refuse(sender, answer, &r, out);
        }
        let c = self.config();
        if !c.users.is_empty() {
            // Decided by the sender's user, never by the name it picked.
            let user = sender.user();
            let refused = match op {
                Opcode::Command
                    if !user
                        .as_ref()
                        .is_some_and(|u| u.may_command(&target.pattern)) =>
                {
                    Some(Reject::NotPermitted(lossy(target_text)))
                }
                Opcode::Echo if !user.as_ref().is_some_and(|u| u.may_echo(&target.pattern)) => {
                    Some(Reject::EchoNotPermitted(lossy(target_text)))
                }
                _ => None,
            };
            if let Some(r) = refused {
                debug!(conn = sender.serial, identity = %sender.identity(), "{r}");
                self.log_refusal(sender, &r, out.now_ms);
                return self.refuse(sender, answer, &r, out);
            }
        }
        let identity = sender.identity();
        let id = (op == Opcode::Command).then(|| sender.next_command_id());
        let mut f = Vec::with_capacity(identity.len() + text.len() + 24);
        reply::delivery(op, &identity, id, text, &mut f);
        let frame = Bytes::from(f);
        let window = c.answer_window;
        drop(c);
        let mut reached = 0u64;
        let mut nodes: Vec<Arc<str>> = Vec::new();
        self.for_each_selected(target, true, |to| {
            if let Some(r) = self.remote_of(to) {
                // A shim of another node: its node delivers it (one message per node).
                if !nodes.contains(&r.node) {
                    nodes.push(r.node.clone());
                }
                reached += 1;
                return;
            }
            if target.pattern.include_self || to.serial != sender.serial {
                // Recorded before the frame is queued: once queued, another core's flush
                // may write it out, and the target answer it, at any moment.
                if let Some(id) = id {
                    to.expect_answer(id, window);
                }
                if self.send(to, Route::Deliver(via), &frame, out).is_some() {
                    reached += 1;
                }
            }
        });
        if !nodes.is_empty() {
            self.cluster_route(
                nodes,
                ToNode::Route {
                    op: op as u8,
                    from: identity.to_string(),
                    id,
                    target: target_text.to_vec(),
                    text: text.to_vec(),
                    udp: via != Via::Tcp,
                },
            );
        }
        // Cut off from the cluster, a target that may name shims elsewhere gets a notice
        // after its answer.
        let notice = target.pattern.is_wildcard() || reached == 0;
        if reached == 0 {
            let r = Reject::NoMatch(lossy(target_text));
            self.refuse(sender, answer, &r, out);
        } else {
            self.charge_deliveries(sender, reached);
            (self.counters().deliveries).fetch_add(reached, Ordering::Relaxed);
            let mut ack = Vec::with_capacity(24);
            reply::ack(id.unwrap_or(0), reached, &mut ack);
            self.send(sender, answer, &Bytes::from(ack), out);
        }
        if notice {
            self.cluster_notice(sender, via, out);
        }
    }

    /// A CommandResponse from `responder`, forwarded to the Command's sender (on UDP when
    /// it came in on UDP and the sender has a channel) when the responder was sent that
    /// Command, among its last `answer_window`; otherwise refused with an Error whose text
    /// starts `response refused:` (so a client never takes it for the answer to one of
    /// its own requests). Not answered when forwarded.
    pub(crate) fn respond(
        &self,
        responder: &Arc<Shim>,
        id: u64,
        id_text: &[u8],
        text: &[u8],
        via: Via,
        out: &mut Effects,
    ) {
        if let Err(r) = self.allow_route(responder, Work::Response, out.now_ms) {
            // Dropped, counted and logged, but not answered: a CommandResponse is owed no
            // answer, and an Error here would be taken for the answer to the responder's
            // own oldest request.
            self.metrics.reject(&r);
            Counters::bump(&self.counters().responses_dropped);
            return;
        }
        let window = self.config().answer_window;
        if !responder.may_answer(id, window) {
            let r = Reject::NotAnswerable(id, window);
            self.log_refusal(responder, &r, out.now_ms);
            return self.refuse(responder, Route::Reply(via), &r, out);
        }
        let identity = responder.identity();
        if let Some(forwarded) = self.cluster_respond(id, &identity, text, via != Via::Tcp) {
            // A Command from another node: the response goes back there.
            if forwarded {
                self.charge_deliveries(responder, 1);
                Counters::bump(&self.counters().deliveries);
            } else {
                Counters::bump(&self.counters().responses_dropped);
            }
            return;
        }
        let Some(sender) = self.table.by_serial(serial_of_command_id(id)) else {
            Counters::bump(&self.counters().responses_dropped);
            debug!(id, "response for a sender that has gone");
            return;
        };
        let mut f = Vec::with_capacity(id_text.len() + identity.len() + text.len() + 4);
        reply::response(id_text, &identity, text, &mut f);
        match self.send(&sender, Route::Deliver(via), &Bytes::from(f), out) {
            Some(_) => {
                self.charge_deliveries(responder, 1);
                Counters::bump(&self.counters().deliveries)
            }
            None => Counters::bump(&self.counters().responses_dropped),
        }
    }

    /// Who over TCP: one WhoEntry per shim `target` names, then `Ack 0 COUNT`, queued as
    /// one listing.
    pub(crate) fn who(&self, sender: &Arc<Shim>, target: &Target, via: Via, out: &mut Effects) {
        if via != Via::Tcp {
            return self.refuse(sender, Route::Reply(via), &Reject::WhoOverUdp, out);
        }
        if let Err(r) = self.allow_route(sender, Work::Who, out.now_ms) {
            return self.refuse(sender, Route::Reply(via), &r, out);
        }
        // On a hub with users, Who lists what the sender's user may see.
        let view = {
            let c = self.config();
            match (c.users.is_empty(), sender.user()) {
                (true, _) => View::All,
                (false, Some(u)) if u.sees_all() => View::All,
                (false, Some(u)) => View::Only(u),
                (false, None) => View::Nothing,
            }
        };
        let mut listing = Vec::new();
        let mut n = 0u64;
        let here = self.cluster().map(|c| c.node.clone());
        self.for_each_selected(target, false, |s| {
            match &view {
                View::All => {}
                View::Only(u) if u.sees(&s.identity()) => {}
                _ => return,
            }
            n += 1;
            let remote = self.remote_of(s);
            let (udp, node) = match &remote {
                Some(r) => (r.udp.load(Ordering::Relaxed), Some(&*r.node)),
                None => (s.udp_addr().is_some(), here.as_deref()),
            };
            reply::who_entry(&s.identity(), s.connected_unix_ms, udp, node, &mut listing);
        });
        self.send_listing(sender, Opcode::WhoEntry, n, listing, 0, out);
        self.cluster_notice(sender, via, out);
    }

    /// Queues a listing of `n` frames of opcode `op` (a Who's entries, a Subscribe's or a
    /// Get's State frames) and its `Ack ID N` as one push, so that no other frame comes
    /// between them; charges and counts them.
    pub(crate) fn send_listing(
        &self,
        sender: &Arc<Shim>,
        op: Opcode,
        n: u64,
        mut listing: Vec<u8>,
        id: u64,
        out: &mut Effects,
    ) {
        self.charge_deliveries(sender, n);
        let frames = listing.len();
        reply::ack(id, n, &mut listing);
        let ack = listing.len() - frames;
        if self
            .send(sender, Route::Listing, &Bytes::from(listing), out)
            .is_some()
        {
            out.count(Transport::Tcp, op as u8, n, frames);
            out.count(Transport::Tcp, Opcode::Ack as u8, 1, ack);
            sender.frames_out.fetch_add(n + 1, Ordering::Relaxed);
        }
    }
}

/// Which identities a Who lists to its sender.
enum View {
    All,
    Only(Arc<crate::config::User>),
    Nothing,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
