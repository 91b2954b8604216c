//! The service's table of sessions, sans IO: who owns which tensors, under which ids,
//! and until when. Time is passed in (milliseconds since the service started).
//!
//! A session is keyed by its owner's verified name and role plus a number the client
//! chose, and maps the client's tensor ids to the GPU actor's. So a caller can only name
//! its own tensors: another caller's ids mean nothing in its sessions, and two clients
//! never collide however they number their tensors.

use std::collections::{HashMap, HashSet, VecDeque};

use strata_gpu::TensorId;

use super::protocol::{Fault, Owner};

/// A session's key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SessionKey {
    pub(crate) owner: Owner,
    pub(crate) session: u64,
}

struct Session {
    expires_ms: u64,
    /// Client id -> GPU actor id.
    ids: HashMap<TensorId, TensorId>,
}

/// Limits of the table.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub(crate) lease_ms: u64,
    pub(crate) max_sessions: usize,
    pub(crate) max_tensors_per_session: usize,
    /// Expired sessions remembered (to answer `LeaseExpired` rather than `UnknownSession`).
    pub(crate) remembered: usize,
}

/// Every open session.
pub(crate) struct Sessions {
    limits: Limits,
    live: HashMap<SessionKey, Session>,
    expired: VecDeque<SessionKey>,
    expired_set: HashSet<SessionKey>,
    /// Sessions ended by their lease or their owner's departure, and their tensors.
    pub(crate) expired_sessions: u64,
    pub(crate) expired_tensors: u64,
}

impl Sessions {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            limits,
            live: HashMap::new(),
            expired: VecDeque::new(),
            expired_set: HashSet::new(),
            expired_sessions: 0,
            expired_tensors: 0,
        }
    }

    /// Opens `key` (or renews it if open).
    pub(crate) fn open(&mut self, key: &SessionKey, now_ms: u64) -> Result<(), Fault> {
        if self.expired_set.contains(key) {
            return Err(Fault::LeaseExpired);
        }
        let expires_ms = now_ms.saturating_add(self.limits.lease_ms);
        if let Some(s) = self.live.get_mut(key) {
            s.expires_ms = expires_ms;
            return Ok(());
        }
        if self.live.len() >= self.limits.max_sessions {
            return Err(Fault::Limit(format!("{} sessions are open", self.live.len())));
        }
        self.live.insert(key.clone(), Session { expires_ms, ids: HashMap::new() });
        Ok(())
    }

    /// Renews the lease of an open session.
    pub(crate) fn touch(&mut self, key: &SessionKey, now_ms: u64) -> Result<(), Fault> {
        let expires_ms = now_ms.saturating_add(self.limits.lease_ms);
        let s = self.get_mut(key)?;
        s.expires_ms = s.expires_ms.max(expires_ms);
        Ok(())
    }

    fn get_mut(&mut self, key: &SessionKey) -> Result<&mut Session, Fault> {
        match self.live.get_mut(key) {
            Some(s) => Ok(s),
            None if self.expired_set.contains(key) => Err(Fault::LeaseExpired),
            None => Err(Fault::UnknownSession),
        }
    }

    /// The GPU actor's id of the session's tensor `id`.
    pub(crate) fn resolve(&self, key: &SessionKey, id: TensorId) -> Option<TensorId> {
        self.live.get(key)?.ids.get(&id).copied()
    }

    /// Number of tensors the session holds.
    pub(crate) fn held(&self, key: &SessionKey) -> usize {
        self.live.get(key).map_or(0, |s| s.ids.len())
    }

    /// Whether `more` tensors fit into the session.
    pub(crate) fn room_for(&self, key: &SessionKey, more: usize) -> Result<(), Fault> {
        let held = self.held(key);
        if held.saturating_add(more) > self.limits.max_tensors_per_session {
            return Err(Fault::Limit(format!(
                "the session holds {held} tensors, {more} more would pass the limit of {}",
                self.limits.max_tensors_per_session
            )));
        }
        Ok(())
    }

    /// Records `local` as the session's tensor `id`, returning the GPU id it replaces.
    /// Fails when the session is gone (the caller then frees `local`).
    pub(crate) fn bind(&mut self, key: &SessionKey, id: TensorId, local: TensorId) -> Result<Option<TensorId>, Fault> {
        let max = self.limits.max_tensors_per_session;
        let s = self.get_mut(key)?;
        if !s.ids.contains_key(&id) && s.ids.len() >= max {
            return Err(Fault::Limit(format!("the session holds {max} tensors, the limit")));
        }
        Ok(s.ids.insert(id, local).filter(|old| *old != local))
    }

    /// Forgets the session's tensor `id`, returning its GPU id.
    pub(crate) fn unbind(&mut self, key: &SessionKey, id: TensorId) -> Option<TensorId> {
        self.live.get_mut(key)?.ids.remove(&id)
    }

    /// Ends a session at its owner's request, returning the GPU ids to free.
    pub(crate) fn close(&mut self, key: &SessionKey) -> Vec<TensorId> {
        self.live.remove(key).map(|s| s.ids.into_values().collect()).unwrap_or_default()
    }

    /// Ends every session whose lease ran out by `now_ms`, returning the GPU ids to free.
    pub(crate) fn sweep(&mut self, now_ms: u64) -> Vec<TensorId> {
        let gone: Vec<SessionKey> =
            self.live.iter().filter(|(_, s)| s.expires_ms <= now_ms).map(|(k, _)| k.clone()).collect();
        self.expire(gone)
    }

    /// Ends every session of `owner` (it left the cluster or failed).
    pub(crate) fn release_owner(&mut self, owner: &Owner) -> Vec<TensorId> {
        let gone: Vec<SessionKey> = self.live.keys().filter(|k| &k.owner == owner).cloned().collect();
        self.expire(gone)
    }

    fn expire(&mut self, keys: Vec<SessionKey>) -> Vec<TensorId> {
        let mut freed = Vec::new();
        for key in keys {
            if let Some(s) = self.live.remove(&key) {
                self.expired_sessions += 1;
                self.expired_tensors += s.ids.len() as u64;
                freed.extend(s.ids.into_values());
                self.remember(key);
            }
        }
        freed
    }

    fn remember(&mut self, key: SessionKey) {
        if self.limits.remembered == 0 {
            return;
        }
        while self.expired.len() >= self.limits.remembered {
            if let Some(old) = self.expired.pop_front() {
                self.expired_set.remove(&old);
            }
        }
        self.expired_set.insert(key.clone());
        self.expired.push_back(key);
    }

    /// Ends every session (the node stops), returning the GPU ids to free.
    pub(crate) fn drain(&mut self) -> Vec<TensorId> {
        self.live.drain().flat_map(|(_, s)| s.ids.into_values()).collect()
    }

    /// Open sessions.
    pub(crate) fn live_sessions(&self) -> usize {
        self.live.len()
    }

    /// Tensors held by open sessions.
    pub(crate) fn live_tensors(&self) -> usize {
        self.live.values().map(|s| s.ids.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote_gpu::protocol::OwnerRole;

    fn key(name: &str, role: OwnerRole, session: u64) -> SessionKey {
        SessionKey { owner: Owner { name: name.into(), role }, session }
    }

    fn table(lease_ms: u64) -> Sessions {
        Sessions::new(Limits { lease_ms, max_sessions: 3, max_tensors_per_session: 2, remembered: 2 })
    }

    #[test]
    fn callers_see_only_their_own_tensors() {
        let mut t = table(100);
        let a = key("node-0", OwnerRole::Node, 1);
        let b = key("node-2", OwnerRole::Node, 1);
        let op = key("node-0", OwnerRole::Operator, 1);
        t.open(&a, 0).unwrap();
        t.open(&op, 0).unwrap();
        assert_eq!(t.bind(&a, TensorId(5), TensorId(50)), Ok(None));
        // Same session number and id, another name or role: nothing there.
        assert_eq!(t.resolve(&b, TensorId(5)), None);
        assert_eq!(t.resolve(&op, TensorId(5)), None);
        assert_eq!(t.bind(&b, TensorId(5), TensorId(51)), Err(Fault::UnknownSession));
        assert_eq!(t.resolve(&a, TensorId(5)), Some(TensorId(50)));
        // Rebinding returns the tensor it replaces, once.
        assert_eq!(t.bind(&a, TensorId(5), TensorId(52)), Ok(Some(TensorId(50))));
        assert_eq!(t.bind(&a, TensorId(5), TensorId(52)), Ok(None));
        assert_eq!(t.unbind(&a, TensorId(5)), Some(TensorId(52)));
        assert_eq!(t.unbind(&a, TensorId(5)), None);
    }

    #[test]
    fn leases_expire_unless_renewed_and_are_remembered() {
        let mut t = table(100);
        let (a, b) = (key("a", OwnerRole::Node, 1), key("b", OwnerRole::Operator, 2));
        t.open(&a, 0).unwrap();
        t.open(&b, 0).unwrap();
        t.bind(&a, TensorId(1), TensorId(10)).unwrap();
        t.bind(&b, TensorId(1), TensorId(11)).unwrap();
        t.touch(&a, 60).unwrap();
        assert_eq!(t.sweep(99), Vec::<TensorId>::new());
        assert_eq!(t.sweep(100), vec![TensorId(11)], "b's lease ran out at 100");
        assert_eq!((t.live_sessions(), t.live_tensors(), t.expired_sessions, t.expired_tensors), (1, 1, 1, 1));
        assert_eq!(t.touch(&b, 101), Err(Fault::LeaseExpired));
        assert_eq!(t.open(&b, 101), Err(Fault::LeaseExpired), "an expired session is not reopened");
        assert_eq!(t.sweep(160), vec![TensorId(10)]);
        // The memory of expired sessions is bounded: the oldest is forgotten.
        let c = key("c", OwnerRole::Node, 3);
        t.open(&c, 200).unwrap();
        t.release_owner(&c.owner);
        assert_eq!(t.touch(&b, 201), Err(Fault::UnknownSession));
        assert_eq!(t.touch(&a, 201), Err(Fault::LeaseExpired));
    }

    #[test]
    fn limits_are_typed_refusals() {
        let mut t = table(100);
        let a = key("a", OwnerRole::Node, 1);
        t.open(&a, 0).unwrap();
        t.bind(&a, TensorId(1), TensorId(10)).unwrap();
        assert!(t.room_for(&a, 1).is_ok());
        assert!(matches!(t.room_for(&a, 2), Err(Fault::Limit(_))));
        t.bind(&a, TensorId(2), TensorId(20)).unwrap();
        assert!(matches!(t.bind(&a, TensorId(3), TensorId(30)), Err(Fault::Limit(_))));
        for s in 2..4 {
            t.open(&key("a", OwnerRole::Node, s), 0).unwrap();
        }
        assert!(matches!(t.open(&key("a", OwnerRole::Node, 9), 0), Err(Fault::Limit(_))));
        let mut freed = t.close(&a);
        freed.sort();
        assert_eq!(freed, vec![TensorId(10), TensorId(20)]);
        assert_eq!(t.touch(&a, 1), Err(Fault::UnknownSession), "a closed session is simply gone");
    }
}
