//! Membership and failure detection, sans IO.
//!
//! Each node keeps a member list. News about a member's own state (joined, left, its
//! incarnation) is taken only from that member, over its own authenticated connection,
//! or from this node's failure detector: direct contact (a hello or heartbeat) marks it
//! alive, its `Leave` marks it left, and silence past the failure timeout marks it failed.
//! Gossip (member lists inside heartbeats) only introduces addresses to dial: it never
//! adds, evicts or resurrects a member, so no member can speak for another. The caller
//! passes the time in and polls for events, so the logic is tested without sockets or
//! clocks.

use std::collections::{BTreeMap, VecDeque};

/// Dial candidates learnt from gossip that are kept at once; more are ignored.
pub const CANDIDATES_MAX: usize = 1024;
/// Failed dials after which a gossiped candidate is forgotten (until gossiped again).
const CANDIDATE_DIALS_MAX: u32 = 5;
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

/// An address gossip says a member (not yet met, or met in an older incarnation) has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The name it should answer to (the dial checks its certificate against it).
    pub name: String,
    /// Where to dial.
    pub addr: String,
    /// The incarnation gossip reported.
    pub incarnation: u64,
    failures: u32,
}

/// The member list of one node.
#[derive(Debug)]
pub struct Membership {
    me: MemberRecord,
    timeout: Duration,
    members: BTreeMap<String, Entry>,
    candidates: BTreeMap<String, Candidate>,
    events: VecDeque<MembershipEvent>,
}

impl Membership {
    /// A member list holding only `me`.
    pub fn new(me: NodeInfo, incarnation: u64, timeout: Duration) -> Self {
        Self {
            me: MemberRecord { info: me, state: MemberState::Alive, incarnation },
            timeout,
            members: BTreeMap::new(),
            candidates: BTreeMap::new(),
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

    /// Direct contact from a member, over its own connection: `info` and `incarnation`
    /// come from the member itself.
    pub fn heard(&mut self, now: Instant, info: &NodeInfo, incarnation: u64) {
        if info.name == self.me.info.name {
            return;
        }
        if self.candidates.get(&info.name).is_some_and(|c| c.incarnation <= incarnation) {
            self.candidates.remove(&info.name);
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

    /// A member list gossiped by a peer. It can only introduce addresses to dial: a
    /// member this node has not met, one that gossip says came back in a newer
    /// incarnation, or one this node saw fail. It never changes a member's state; the member itself does that when
    /// the dial reaches it.
    pub fn merge(&mut self, _now: Instant, records: &[MemberRecord]) {
        for r in records {
            let name = &r.info.name;
            if *name == self.me.info.name || r.state != MemberState::Alive {
                continue;
            }
            // A failed member may be alive behind a healed partition: worth a dial too.
            let newer = match self.members.get(name) {
                None => true,
                Some(e) => {
                    r.incarnation > e.record.incarnation
                        || (e.record.state == MemberState::Failed && r.incarnation == e.record.incarnation)
                }
            };
            if !newer || r.info.addr.is_empty() {
                continue;
            }
            let room = self.candidates.len() < CANDIDATES_MAX;
            match self.candidates.get_mut(name) {
                Some(c) if c.incarnation < r.incarnation || c.addr != r.info.addr => {
                    *c = Candidate {
                        name: name.clone(),
                        addr: r.info.addr.clone(),
                        incarnation: r.incarnation,
                        failures: 0,
                    };
                }
                Some(_) => {}
                None if room => {
                    self.candidates.insert(
                        name.clone(),
                        Candidate {
                            name: name.clone(),
                            addr: r.info.addr.clone(),
                            incarnation: r.incarnation,
                            failures: 0,
                        },
                    );
                }
                None => {}
            }
        }
    }

    /// Addresses gossip introduced that are worth dialing.
    pub fn candidates(&self) -> impl Iterator<Item = &Candidate> {
        self.candidates.values()
    }

    /// A dial of candidate `name` failed; after a few failures it is forgotten.
    pub fn dial_failed(&mut self, name: &str) {
        if let Some(c) = self.candidates.get_mut(name) {
            c.failures += 1;
            if c.failures >= CANDIDATE_DIALS_MAX {
                self.candidates.remove(name);
            }
        }
    }

    /// A member said goodbye (over its own connection).
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

    fn alive(name: &str, incarnation: u64) -> MemberRecord {
        MemberRecord { info: info(name), state: MemberState::Alive, incarnation }
    }

    #[test]
    fn contact_gossip_and_failure() {
        let t0 = Instant::now();
        let mut m = Membership::new(info("a"), 1, T);
        m.heard(t0, &info("b"), 1);
        // Gossip about c only makes it a dial candidate; c joins when it answers itself.
        m.merge(t0, &[alive("c", 5)]);
        assert_eq!(drain(&mut m), vec![MembershipEvent::Joined(info("b"))]);
        assert_eq!(m.candidates().map(|c| (c.name.as_str(), c.addr.as_str())).collect::<Vec<_>>(), [("c", "c:1")]);
        m.heard(t0, &info("c"), 5);
        assert_eq!(drain(&mut m), vec![MembershipEvent::Joined(info("c"))]);
        assert_eq!(m.candidates().count(), 0);
        assert_eq!(m.alive().iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(m.poll_timeout(), Some(t0 + T));
        // b keeps talking, c goes silent.
        m.heard(t0 + Duration::from_secs(2), &info("b"), 1);
        m.handle_timeout(t0 + Duration::from_millis(3500));
        assert_eq!(drain(&mut m), vec![MembershipEvent::Failed { name: "c".into(), silent_ms: 3500 }]);
        // Gossip that c is alive, even in a newer incarnation, does not revive it: it only
        // offers c's address to dial. c itself, restarted, does.
        m.merge(t0 + Duration::from_secs(4), &[alive("c", 5), alive("c", 9)]);
        assert!(drain(&mut m).is_empty());
        assert_eq!(m.get("c").unwrap().state, MemberState::Failed);
        assert_eq!(m.candidates().map(|c| c.incarnation).collect::<Vec<_>>(), [9]);
        m.heard(t0 + Duration::from_secs(5), &info("c"), 9);
        assert_eq!(drain(&mut m), vec![MembershipEvent::Joined(info("c"))]);
        m.left("b");
        m.left("b");
        assert_eq!(drain(&mut m), vec![MembershipEvent::Left("b".into())]);
        // A stale heartbeat from b does not bring it back.
        m.heard(t0 + Duration::from_secs(6), &info("b"), 1);
        assert!(drain(&mut m).is_empty());
    }

    /// A member that lies about others changes nothing about them.
    #[test]
    fn gossip_never_evicts_or_resurrects() {
        let t0 = Instant::now();
        let mut m = Membership::new(info("a"), 1, T);
        m.heard(t0, &info("b"), 3);
        drain(&mut m);
        let lies = [
            MemberRecord { info: info("b"), state: MemberState::Left, incarnation: u64::MAX },
            MemberRecord { info: info("b"), state: MemberState::Failed, incarnation: u64::MAX },
            MemberRecord { info: info("a"), state: MemberState::Left, incarnation: u64::MAX },
        ];
        m.merge(t0, &lies);
        assert!(drain(&mut m).is_empty());
        assert_eq!(m.get("b").unwrap().state, MemberState::Alive);
        assert_eq!(m.get("b").unwrap().incarnation, 3);
        assert_eq!(m.candidates().count(), 0);
        // b really leaves; gossip that it is back does not bring it back.
        m.left("b");
        drain(&mut m);
        m.merge(t0, &[alive("b", 3)]);
        assert!(drain(&mut m).is_empty());
        assert_eq!(m.get("b").unwrap().state, MemberState::Left);
        // Candidates are bounded and given up after failed dials.
        let flood: Vec<MemberRecord> = (0..CANDIDATES_MAX + 10).map(|i| alive(&format!("x{i}"), 1)).collect();
        m.merge(t0, &flood);
        assert_eq!(m.candidates().count(), CANDIDATES_MAX);
        for _ in 0..CANDIDATE_DIALS_MAX {
            m.dial_failed("x0");
        }
        assert_eq!(m.candidates().count(), CANDIDATES_MAX - 1);
    }

    /// Nodes that meet the members gossip introduces converge on the same alive set.
    #[test]
    fn gossip_converges() {
        let t0 = Instant::now();
        let mut nodes: Vec<Membership> =
            ["a", "b", "c", "d"].iter().enumerate().map(|(i, n)| Membership::new(info(n), i as u64, T)).collect();
        // a knows b, b knows c, c knows d: a chain.
        for (x, y) in [(0, 1), (1, 2), (2, 3)] {
            let (iy, incy) = (nodes[y].me().info.clone(), nodes[y].me().incarnation);
            nodes[x].heard(t0, &iy, incy);
            let (ix, incx) = (nodes[x].me().info.clone(), nodes[x].me().incarnation);
            nodes[y].heard(t0, &ix, incx);
        }
        let by_name: BTreeMap<String, (NodeInfo, u64)> =
            nodes.iter().map(|n| (n.me().info.name.clone(), (n.me().info.clone(), n.me().incarnation))).collect();
        for _ in 0..4 {
            let lists: Vec<Vec<MemberRecord>> = nodes.iter().map(|n| n.records()).collect();
            for (i, n) in nodes.iter_mut().enumerate() {
                for (j, l) in lists.iter().enumerate() {
                    if i != j {
                        n.merge(t0, l);
                    }
                }
                // Dial every candidate: the member answers for itself.
                let dials: Vec<String> = n.candidates().map(|c| c.name.clone()).collect();
                for name in dials {
                    let (i, inc) = &by_name[&name];
                    n.heard(t0, i, *inc);
                }
            }
        }
        for n in &nodes {
            assert_eq!(n.alive().len(), 4, "{:?}", n.alive());
        }
    }
}
