//! Membership and failure detection, sans IO.
//!
//! Each node keeps a member list. Direct contact (a hello or heartbeat from a member)
//! marks it alive; gossip (member lists inside heartbeats) adds members this node has
//! not met; a member silent for longer than the failure timeout is declared failed. The
//! caller passes the time in and polls for events, so the logic is tested without
//! sockets or clocks.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use strata_wire::{MemberRecord, MemberState, NodeInfo};

/// A change in the member list that upper layers act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A member joined (or came back with a new incarnation).
    Joined(NodeInfo),
    /// A member was silent for longer than the failure timeout.
    Failed {
        /// The member.
        name: String,
        /// How long it had been silent, ms.
        silent_ms: u64,
    },
    /// A member left on purpose.
    Left(String),
}

#[derive(Clone, Debug)]
struct Entry {
    record: MemberRecord,
    last_heard: Instant,
}

/// The member list of one node.
#[derive(Debug)]
pub struct Membership {
    me: MemberRecord,
    timeout: Duration,
    members: BTreeMap<String, Entry>,
    events: VecDeque<MembershipEvent>,
}

impl Membership {
    /// A member list holding only `me`.
    pub fn new(me: NodeInfo, incarnation: u64, timeout: Duration) -> Self {
        Self {
            me: MemberRecord { info: me, state: MemberState::Alive, incarnation },
            timeout,
            members: BTreeMap::new(),
            events: VecDeque::new(),
        }
    }

    /// This node's record.
    pub fn me(&self) -> &MemberRecord {
        &self.me
    }

    /// Replaces this node's self-description (free resources change).
    pub fn update_me(&mut self, info: NodeInfo) {
        self.me.info = info;
    }

    /// Direct contact from a member.
    pub fn heard(&mut self, now: Instant, info: &NodeInfo, incarnation: u64) {
        if info.name == self.me.info.name {
            return;
        }
        match self.members.get_mut(&info.name) {
            None => {
                self.members.insert(
                    info.name.clone(),
                    Entry {
                        record: MemberRecord { info: info.clone(), state: MemberState::Alive, incarnation },
                        last_heard: now,
                    },
                );
                self.events.push_back(MembershipEvent::Joined(info.clone()));
            }
            Some(e) => {
                if incarnation < e.record.incarnation {
                    return;
                }
                let revived = e.record.state == MemberState::Failed
                    || (e.record.state == MemberState::Left && incarnation > e.record.incarnation);
                if e.record.state == MemberState::Left && !revived {
                    return;
                }
                e.record.info = info.clone();
                e.record.incarnation = incarnation;
                e.record.state = MemberState::Alive;
                e.last_heard = now;
                if revived {
                    self.events.push_back(MembershipEvent::Joined(info.clone()));
                }
            }
        }
    }

    /// A member list gossiped by a peer: learn members we have not met, and departures.
    /// Failures are not taken from gossip: each node judges silence itself.
    pub fn merge(&mut self, now: Instant, records: &[MemberRecord]) {
        for r in records {
            if r.info.name == self.me.info.name {
                continue;
            }
            match self.members.get_mut(&r.info.name) {
                None => {
                    self.members.insert(r.info.name.clone(), Entry { record: r.clone(), last_heard: now });
                    if r.state == MemberState::Alive {
                        self.events.push_back(MembershipEvent::Joined(r.info.clone()));
                    }
                }
                Some(e) => {
                    let newer = r.incarnation > e.record.incarnation;
                    if r.state == MemberState::Left
                        && r.incarnation >= e.record.incarnation
                        && e.record.state != MemberState::Left
                    {
                        e.record.state = MemberState::Left;
                        self.events.push_back(MembershipEvent::Left(r.info.name.clone()));
                    } else if newer && r.state == MemberState::Alive {
                        let was_alive = e.record.state == MemberState::Alive;
                        e.record = r.clone();
                        e.last_heard = now;
                        if !was_alive {
                            self.events.push_back(MembershipEvent::Joined(r.info.clone()));
                        }
                    }
                }
            }
        }
    }

    /// A member said goodbye.
    pub fn left(&mut self, name: &str) {
        if let Some(e) = self.members.get_mut(name)
            && e.record.state != MemberState::Left
        {
            e.record.state = MemberState::Left;
            self.events.push_back(MembershipEvent::Left(name.to_string()));
        }
    }

    /// Declares failed every alive member silent for longer than the timeout.
    pub fn handle_timeout(&mut self, now: Instant) {
        for (name, e) in &mut self.members {
            let silent = now.saturating_duration_since(e.last_heard);
            if e.record.state == MemberState::Alive && silent > self.timeout {
                e.record.state = MemberState::Failed;
                self.events
                    .push_back(MembershipEvent::Failed { name: name.clone(), silent_ms: silent.as_millis() as u64 });
            }
        }
    }

    /// When [`Membership::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.members
            .values()
            .filter(|e| e.record.state == MemberState::Alive)
            .map(|e| e.last_heard + self.timeout)
            .min()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<MembershipEvent> {
        self.events.pop_front()
    }

    /// Every record, this node first.
    pub fn records(&self) -> Vec<MemberRecord> {
        std::iter::once(self.me.clone()).chain(self.members.values().map(|e| e.record.clone())).collect()
    }

    /// Alive members including this node, sorted by name.
    pub fn alive(&self) -> Vec<NodeInfo> {
        let mut v: Vec<NodeInfo> =
            self.records().into_iter().filter(|r| r.state == MemberState::Alive).map(|r| r.info).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The record of `name`, if known.
    pub fn get(&self, name: &str) -> Option<&MemberRecord> {
        if name == self.me.info.name { Some(&self.me) } else { self.members.get(name).map(|e| &e.record) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> NodeInfo {
        NodeInfo { name: name.into(), addr: format!("{name}:1"), ..Default::default() }
    }

    fn drain(m: &mut Membership) -> Vec<MembershipEvent> {
        std::iter::from_fn(|| m.poll_event()).collect()
    }

    const T: Duration = Duration::from_secs(3);

    #[test]
    fn contact_gossip_and_failure() {
        let t0 = Instant::now();
        let mut m = Membership::new(info("a"), 1, T);
        m.heard(t0, &info("b"), 1);
        m.merge(t0, &[MemberRecord { info: info("c"), state: MemberState::Alive, incarnation: 5 }]);
        assert_eq!(drain(&mut m), vec![MembershipEvent::Joined(info("b")), MembershipEvent::Joined(info("c"))]);
        assert_eq!(m.alive().iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(m.poll_timeout(), Some(t0 + T));
        // b keeps talking, c goes silent.
        m.heard(t0 + Duration::from_secs(2), &info("b"), 1);
        m.handle_timeout(t0 + Duration::from_millis(3500));
        assert_eq!(drain(&mut m), vec![MembershipEvent::Failed { name: "c".into(), silent_ms: 3500 }]);
        // Gossip that c is alive with the same incarnation does not revive it; a restart does.
        m.merge(
            t0 + Duration::from_secs(4),
            &[MemberRecord { info: info("c"), state: MemberState::Alive, incarnation: 5 }],
        );
        assert!(drain(&mut m).is_empty());
        m.heard(t0 + Duration::from_secs(5), &info("c"), 6);
        assert_eq!(drain(&mut m), vec![MembershipEvent::Joined(info("c"))]);
        m.left("b");
        m.left("b");
        assert_eq!(drain(&mut m), vec![MembershipEvent::Left("b".into())]);
        // A stale heartbeat from b does not bring it back.
        m.heard(t0 + Duration::from_secs(6), &info("b"), 1);
        assert!(drain(&mut m).is_empty());
    }

    /// Three nodes gossiping in memory converge on the same alive set.
    #[test]
    fn gossip_converges() {
        let t0 = Instant::now();
        let mut nodes: Vec<Membership> =
            ["a", "b", "c", "d"].iter().enumerate().map(|(i, n)| Membership::new(info(n), i as u64, T)).collect();
        // a knows b, b knows c, c knows d: a chain.
        for (x, y) in [(0, 1), (1, 2), (2, 3)] {
            let (iy, incy) = (nodes[y].me().info.clone(), nodes[y].me().incarnation);
            nodes[x].heard(t0, &iy, incy);
        }
        for round in 0..4 {
            let lists: Vec<Vec<MemberRecord>> = nodes.iter().map(|n| n.records()).collect();
            for (i, n) in nodes.iter_mut().enumerate() {
                for (j, l) in lists.iter().enumerate() {
                    if i != j {
                        n.merge(t0 + Duration::from_millis(round), l);
                    }
                }
            }
        }
        for n in &nodes {
            assert_eq!(n.alive().len(), 4, "{:?}", n.alive());
        }
    }
}
