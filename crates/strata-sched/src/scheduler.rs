//! The scheduler state machine.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};

use crate::error::SchedError;
use crate::journal::{JournalRecord, Outcome};
use crate::types::{
    Cause, CauseChain, Delivery, Demand, Event, NodeResources, NodeStatus, Placement, TaskId, TaskInfo, TaskSpec,
    TaskState, Usage,
};

/// The scheduler's settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// At most this many tasks wait (queued, not placed); a submit beyond it is refused.
    /// Tasks that go back to the queue after a failure are admitted regardless.
    pub queue_bound: usize,
    /// At most this many waiting tasks, in queue order, are examined per placement: the
    /// head of the queue may be bypassed by a task at most this far back.
    pub lookahead: usize,
    /// A task bypassed for this long (since the first bypass, ms) gets a node reserved.
    pub max_bypass_wait_ms: u64,
    /// A task bypassed this many times gets a node reserved.
    pub max_bypasses: u32,
    /// Extra attempts after the first, for tasks that do not say.
    pub default_retries: u32,
    /// A waiting task that no live node could hold (its nodes were lost or shrank) fails
    /// after this long, ms, unless a node that could hold it comes up.
    pub unplaceable_grace_ms: u64,
    /// After [`Scheduler::recover`], nodes with placed attempts have this long, ms, to
    /// report again ([`Scheduler::node_up`]) before their attempts count as lost.
    pub recovery_grace_ms: u64,
    /// How many delivered results are remembered to tell a duplicate from a late report.
    pub remember_done: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            queue_bound: 100_000,
            lookahead: 256,
            max_bypass_wait_ms: 10_000,
            max_bypasses: 1_000,
            default_retries: 3,
            unplaceable_grace_ms: 60_000,
            recovery_grace_ms: 30_000,
            remember_done: 65_536,
        }
    }
}

/// Queue order: higher priority first, then submission order.
type QueueKey = (Reverse<i32>, u64);

/// A fast hasher for integer keys (the default SipHash costs more than the lookups it guards).
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Amount {
    mem: u64,
    gpus: u32,
    cpus: u32,
}

impl Amount {
    fn of(d: &Demand) -> Self {
        Self { mem: d.gpu_mem_bytes, gpus: d.gpu_slots, cpus: d.cpu_slots }
    }
    fn of_node(r: &NodeResources) -> Self {
        Self { mem: r.gpu_mem_bytes, gpus: r.gpu_slots, cpus: r.cpu_slots }
    }
    fn covers(self, need: Amount) -> bool {
        self.mem >= need.mem && self.gpus >= need.gpus && self.cpus >= need.cpus
    }
    fn minus(self, o: Amount) -> Self {
        Self {
            mem: self.mem.saturating_sub(o.mem),
            gpus: self.gpus.saturating_sub(o.gpus),
            cpus: self.cpus.saturating_sub(o.cpus),
        }
    }
    fn plus(self, o: Amount) -> Self {
        Self {
            mem: self.mem.saturating_add(o.mem),
            gpus: self.gpus.saturating_add(o.gpus),
            cpus: self.cpus.saturating_add(o.cpus),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// In `queue`.
    Queued,
    /// In `parked`: no live node could hold it.
    Parked { since: u64 },
    /// Its current attempt holds resources on `node`.
    Placed { attempt: u32, node: u32, started: bool },
}

#[derive(Debug)]
struct Task {
    id: TaskId,
    /// With `id` and `retries` resolved.
    spec: TaskSpec,
    need: Amount,
    /// Input bytes per node index.
    inputs: Vec<(u32, u64)>,
    seq: u64,
    submitted_ms: u64,
    attempts: u32,
    causes: Vec<Cause>,
    state: State,
    /// The epoch at which no node could take it; only nodes improved since need checking.
    checked_epoch: Option<u64>,
    bypasses: u32,
    bypassed_since: Option<u64>,
    reserved: Option<u32>,
}

impl Task {
    fn key(&self) -> QueueKey {
        (Reverse(self.spec.priority), self.seq)
    }

    fn starving(&self, now: u64, config: &SchedulerConfig) -> bool {
        self.bypasses >= config.max_bypasses
            || self.bypassed_since.is_some_and(|s| now.saturating_sub(s) >= config.max_bypass_wait_ms)
    }
}

#[derive(Debug)]
struct Node {
    name: String,
    capacity: Amount,
    labels: BTreeMap<String, String>,
    used: Amount,
    live: bool,
    /// The starving task this node is kept for: tasks behind it in queue order may not start here.
    reserved_for: Option<(QueueKey, TaskId)>,
    /// Attempts holding resources here.
    attempts: BTreeSet<(TaskId, u32)>,
}

impl Node {
    fn free(&self) -> Amount {
        self.capacity.minus(self.used)
    }

    /// Whether the node could hold the task if it were idle.
    fn could_hold(&self, need: Amount, labels: &BTreeMap<String, String>) -> bool {
        self.capacity.covers(need) && labels_match(labels, &self.labels)
    }

    fn resources(&self) -> NodeResources {
        NodeResources {
            gpu_mem_bytes: self.capacity.mem,
            gpu_slots: self.capacity.gpus,
            cpu_slots: self.capacity.cpus,
            labels: self.labels.clone(),
        }
    }
}

fn labels_match(required: &BTreeMap<String, String>, offered: &BTreeMap<String, String>) -> bool {
    required.iter().all(|(k, v)| offered.get(k) == Some(v))
}

/// What the placement scan reads per node, kept contiguous (synced from [`Node`] by `sync`).
#[derive(Clone, Copy, Debug, Default)]
struct Hot {
    free: Amount,
    live: bool,
    reserved: bool,
}

/// An attempt holding resources on a node.
#[derive(Clone, Copy, Debug)]
struct Slot {
    node: u32,
    need: Amount,
    /// Its task ended (cancelled or expired) while it ran; it holds resources until the
    /// node reports its end or is lost.
    zombie: bool,
}

/// The cluster task queue: fed events, polled for placements, outcomes and journal records.
///
/// See the crate documentation for the rules and guarantees.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    tasks: IdMap<TaskId, Task>,
    queue: BTreeMap<QueueKey, TaskId>,
    parked: BTreeMap<TaskId, u64>,
    nodes: Vec<Node>,
    hot: Vec<Hot>,
    node_names: HashMap<String, u32>,
    placements: IdMap<(TaskId, u32), Slot>,
    deadlines: BTreeSet<(u64, TaskId)>,
    done: VecDeque<TaskId>,
    done_attempt: IdMap<TaskId, u32>,
    events: VecDeque<Event>,
    journal: VecDeque<JournalRecord>,
    /// Counts improvements (a node gained free resources, came up, lost a reservation).
    epoch: u64,
    /// The latest improvements, `(epoch, node)`, one per epoch.
    improved: VecDeque<(u64, u32)>,
    /// Whether a poll could place anything (false after a poll found nothing, until a change).
    dirty: bool,
    next_id: u64,
    next_seq: u64,
    recovery_until: Option<u64>,
    skipped: Vec<TaskId>,
    /// Per `checked_epoch` of a task (`None`: all nodes), the most any node it would
    /// check has free, valid while `epoch` stays `bounds_epoch` (free only shrinks meanwhile).
    bounds: Vec<(Option<u64>, Amount)>,
    bounds_epoch: u64,
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            tasks: IdMap::default(),
            queue: BTreeMap::new(),
            parked: BTreeMap::new(),
            nodes: Vec::new(),
            hot: Vec::new(),
            node_names: HashMap::new(),
            placements: IdMap::default(),
            deadlines: BTreeSet::new(),
            done: VecDeque::new(),
            done_attempt: IdMap::default(),
            events: VecDeque::new(),
            journal: VecDeque::new(),
            epoch: 0,
            improved: VecDeque::new(),
            dirty: false,
            next_id: 1,
            next_seq: 0,
            recovery_until: None,
            skipped: Vec::new(),
            bounds: Vec::new(),
            bounds_epoch: 0,
        }
    }

    /// The settings.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    // ---- events in ----

    /// Adds a task to the queue and returns its id.
    ///
    /// Refused (state unchanged) when the queue is at its bound, the id is in use, the
    /// deadline is not after `now_ms`, or no live node could ever hold the demand. After
    /// [`Scheduler::recover`], until the recovery grace ends, a demand no live node can
    /// hold is accepted and waits for nodes to report (see the crate docs).
    pub fn submit(&mut self, now_ms: u64, mut spec: TaskSpec) -> Result<TaskId, SchedError> {
        let waiting = self.queue.len() + self.parked.len();
        if waiting >= self.config.queue_bound {
            return Err(SchedError::QueueFull { queued: waiting, bound: self.config.queue_bound });
        }
        if let Some(deadline_ms) = spec.deadline_ms
            && deadline_ms <= now_ms
        {
            return Err(SchedError::DeadlinePassed { deadline_ms, now_ms });
        }
        let id = match spec.id {
            Some(id) if self.tasks.contains_key(&id) || self.done_attempt.contains_key(&id) => {
                return Err(SchedError::DuplicateTask { task: id });
            }
            Some(id) => id,
            None => TaskId(self.next_id),
        };
        let need = Amount::of(&spec.demand);
        if self.recovery_until.is_none() && !self.feasible(need, &spec.demand.labels) {
            return Err(SchedError::Infeasible { demand: spec.demand, largest: self.largest_node() });
        }
        spec.id = Some(id);
        spec.retries = Some(spec.retries.unwrap_or(self.config.default_retries));
        self.next_id = self.next_id.max(id.0.saturating_add(1));
        let seq = self.next_seq;
        self.next_seq += 1;
        self.journal.push_back(JournalRecord::Submitted {
            task: id,
            seq,
            at_ms: now_ms,
            attempts: 0,
            causes: Vec::new(),
            spec: spec.clone(),
        });
        self.insert_task(id, seq, now_ms, 0, Vec::new(), spec);
        self.enqueue(now_ms, id, self.recovery_until.is_none());
        Ok(id)
    }

    /// A node reports its capacity: it joins, comes back after being lost, re-reports after
    /// a scheduler restart (keeping its recovered attempts), or changes its capacity.
    ///
    /// A node that was declared lost must have stopped what it ran before it reports again:
    /// its old attempts were released when it was lost. After [`Scheduler::recover`], the
    /// IO layer reports with [`Scheduler::task_failed`] any recovered attempt the node no
    /// longer runs.
    pub fn node_up(&mut self, now_ms: u64, name: &str, resources: NodeResources) {
        let n = self.node_index(name);
        let node = &mut self.nodes[n as usize];
        let was_live = node.live;
        let old_capacity = node.capacity;
        let old_labels = std::mem::replace(&mut node.labels, resources.labels.clone());
        node.capacity = Amount::of_node(&resources);
        node.live = true;
        let shrank = !node.capacity.covers(old_capacity) || !labels_match(&old_labels, &node.labels);
        self.sync(n);
        self.improve(n);
        if was_live && shrank {
            self.after_shrink(now_ms, n, old_capacity, &old_labels);
        }
        self.unpark_for(n);
    }

    /// A live node's capacity or labels changed.
    pub fn node_resources(&mut self, now_ms: u64, name: &str, resources: NodeResources) -> Result<(), SchedError> {
        match self.node_names.get(name) {
            Some(&n) if self.nodes[n as usize].live => {
                self.node_up(now_ms, name, resources);
                Ok(())
            }
            _ => Err(SchedError::UnknownNode { op: "node resources", node: name.to_string() }),
        }
    }

    /// A node is gone: its attempts are released; their tasks go back to the queue (each
    /// lost attempt counts against the retry budget) or fail when the budget is spent.
    /// Reports from its attempts that arrive later are [`Delivery::Late`]. Unknown names
    /// and nodes already lost are ignored.
    pub fn node_lost(&mut self, now_ms: u64, name: &str) {
        let Some(&n) = self.node_names.get(name) else { return };
        let node = &mut self.nodes[n as usize];
        if !node.live && node.attempts.is_empty() {
            return;
        }
        node.live = false;
        self.sync(n);
        let reason = format!("node {name} was lost");
        self.drop_node_attempts(now_ms, n, &reason);
        let node = &mut self.nodes[n as usize];
        if let Some((_, t)) = node.reserved_for.take()
            && let Some(task) = self.tasks.get_mut(&t)
        {
            task.reserved = None;
        }
        self.sync(n);
        let node = &self.nodes[n as usize];
        let (capacity, labels) = (node.capacity, node.labels.clone());
        self.park_unplaceable(now_ms, |t| capacity.covers(t.need) && labels_match(&t.spec.demand.labels, &labels));
        self.dirty = true;
    }

    /// The node started this attempt. [`Delivery::Late`] means the attempt is no longer
    /// current: the IO layer should stop it.
    pub fn task_started(&mut self, _now_ms: u64, task: TaskId, attempt: u32) -> Delivery {
        match self.placements.get(&(task, attempt)) {
            Some(slot) if !slot.zombie => {
                if let Some(t) = self.tasks.get_mut(&task)
                    && let State::Placed { started, .. } = &mut t.state
                {
                    *started = true;
                }
                Delivery::Deliver
            }
            _ => Delivery::Late,
        }
    }

    /// The node finished this attempt. Deliver its result only on [`Delivery::Deliver`],
    /// which happens at most once per task.
    pub fn task_finished(&mut self, _now_ms: u64, task: TaskId, attempt: u32) -> Delivery {
        match self.placements.get(&(task, attempt)) {
            Some(slot) if slot.zombie => {
                self.release(task, attempt);
                Delivery::Late
            }
            Some(_) => {
                self.release(task, attempt);
                self.end_task(task, Outcome::Finished { attempt });
                Delivery::Deliver
            }
            None if self.done_attempt.get(&task) == Some(&attempt) => Delivery::Duplicate,
            None => Delivery::Late,
        }
    }

    /// The node reports this attempt failed. A retryable failure sends the task back to
    /// its place in the queue while its retry budget lasts; otherwise it fails for good
    /// with every cause ([`Event::Failed`]). [`Delivery::Deliver`] means the report was applied.
    pub fn task_failed(
        &mut self,
        now_ms: u64,
        task: TaskId,
        attempt: u32,
        reason: impl Into<String>,
        retryable: bool,
    ) -> Delivery {
        match self.placements.get(&(task, attempt)) {
            Some(slot) if slot.zombie => {
                self.release(task, attempt);
                Delivery::Late
            }
            Some(slot) => {
                let node = self.nodes[slot.node as usize].name.clone();
                self.release(task, attempt);
                let cause = Cause { attempt: Some(attempt), node: Some(node), reason: reason.into() };
                self.retry_or_fail(now_ms, task, cause, retryable);
                Delivery::Deliver
            }
            None if self.done_attempt.get(&task) == Some(&attempt) => Delivery::Duplicate,
            None => Delivery::Late,
        }
    }

    /// Cancels a waiting or placed task ([`Event::Cancelled`]; a placed one also gets
    /// [`Event::Abort`] and keeps its resources until the node reports or is lost).
    pub fn cancel(&mut self, _now_ms: u64, task: TaskId) -> Result<(), SchedError> {
        if !self.tasks.contains_key(&task) {
            return Err(SchedError::UnknownTask { op: "cancel", task });
        }
        self.end_task(task, Outcome::Cancelled);
        Ok(())
    }

    /// Time passed: expires tasks past their deadline, fails tasks no live node could hold
    /// for [`SchedulerConfig::unplaceable_grace_ms`], and ends the recovery grace.
    /// Call it by [`Scheduler::next_timeout`] at the latest.
    pub fn tick(&mut self, now_ms: u64) {
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now_ms {
                break;
            }
            self.deadlines.pop_first();
            self.end_task(id, Outcome::Expired);
        }
        if let Some(until) = self.recovery_until
            && now_ms >= until
        {
            self.recovery_until = None;
            self.finish_recovery(now_ms);
        }
        let grace = self.config.unplaceable_grace_ms;
        let expired: Vec<TaskId> = self
            .parked
            .iter()
            .filter(|&(_, &since)| now_ms.saturating_sub(since) >= grace)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            let Some(task) = self.tasks.get(&id) else { continue };
            let largest = match self.largest_node() {
                Some((name, capacity)) => format!("the largest live node, {name}, has {capacity}"),
                None => "the cluster has no live node".to_string(),
            };
            let reason = format!("no live node could hold {} for {grace} ms; {largest}", task.spec.demand);
            self.fail_final(id, Cause { attempt: None, node: None, reason });
        }
    }

    /// When [`Scheduler::tick`] next has work, ms.
    pub fn next_timeout(&self) -> Option<u64> {
        let grace = self.config.unplaceable_grace_ms;
        let parked = self.parked.values().map(|&since| since.saturating_add(grace)).min();
        [self.deadlines.first().map(|&(d, _)| d), self.recovery_until, parked].into_iter().flatten().min()
    }

    // ---- actions out ----

    /// The next placement to carry out, if any task can be placed now.
    ///
    /// Persist the journal records polled before carrying the placement out.
    pub fn poll_placement(&mut self, now_ms: u64) -> Option<Placement> {
        if !self.dirty {
            return None;
        }
        let mut skipped = std::mem::take(&mut self.skipped);
        skipped.clear();
        let mut found = None;
        {
            let Self { queue, tasks, nodes, hot, improved, epoch, config, bounds, bounds_epoch, .. } = self;
            if *bounds_epoch != *epoch {
                bounds.clear();
                *bounds_epoch = *epoch;
            }
            let view = View { hot, nodes, improved, epoch: *epoch };
            for (&key, &id) in queue.iter().take(config.lookahead.max(1)) {
                let Some(task) = tasks.get_mut(&id) else { continue };
                if let Some(n) = find_node(&view, bounds, key, task) {
                    found = Some((key, id, n));
                    break;
                }
                task.checked_epoch = Some(*epoch);
                if task.reserved.is_none()
                    && task.starving(now_ms, config)
                    && let Some((n, displaced)) = reserve(view.nodes, view.hot, key, task)
                {
                    task.reserved = Some(n);
                    if let Some(other) = displaced.and_then(|d| tasks.get_mut(&d)) {
                        other.reserved = None;
                    }
                }
                skipped.push(id);
            }
        }
        let placement = match found {
            None => {
                self.dirty = false;
                None
            }
            Some((key, id, n)) => {
                for s in &skipped {
                    if let Some(t) = self.tasks.get_mut(s) {
                        t.bypasses = t.bypasses.saturating_add(1);
                        t.bypassed_since.get_or_insert(now_ms);
                    }
                }
                Some(self.place(key, id, n))
            }
        };
        self.skipped = skipped;
        placement
    }

    /// The next outcome or instruction for the IO layer.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next journal record to persist, in order.
    pub fn poll_journal(&mut self) -> Option<JournalRecord> {
        self.journal.pop_front()
    }

    // ---- persistence ----

    /// Rebuilds a scheduler from journal records (a live log, a [`Scheduler::snapshot`],
    /// or a snapshot followed by the log written after it).
    ///
    /// Every waiting task is waiting again, in the same order. Every placed attempt is
    /// placed again on its node, which is not live until it reports with
    /// [`Scheduler::node_up`]; a node that has not reported within
    /// [`SchedulerConfig::recovery_grace_ms`] of `now_ms` is treated as lost (its attempts
    /// go back to the queue, counted). Aging restarts from zero.
    pub fn recover(
        config: SchedulerConfig,
        records: impl IntoIterator<Item = JournalRecord>,
        now_ms: u64,
    ) -> Result<Self, SchedError> {
        let mut s = Self::new(config);
        for (index, record) in records.into_iter().enumerate() {
            s.apply(record).map_err(|reason| SchedError::Journal { index, reason })?;
        }
        s.recovery_until = Some(now_ms.saturating_add(s.config.recovery_grace_ms));
        s.dirty = true;
        Ok(s)
    }

    /// The persistent state as a compact record list, in a canonical order; recovering
    /// from it gives the same snapshot.
    pub fn snapshot(&self) -> Vec<JournalRecord> {
        let mut out = vec![JournalRecord::Counters { next_task: self.next_id, next_seq: self.next_seq }];
        let mut tasks: Vec<&Task> = self.tasks.values().collect();
        tasks.sort_by_key(|t| t.seq);
        for t in tasks {
            let placed = match t.state {
                State::Placed { attempt, node, .. } => Some((attempt, node)),
                _ => None,
            };
            out.push(JournalRecord::Submitted {
                task: t.id,
                seq: t.seq,
                at_ms: t.submitted_ms,
                attempts: placed.map_or(t.attempts, |(a, _)| a - 1),
                causes: t.causes.clone(),
                spec: t.spec.clone(),
            });
            if let Some((attempt, node)) = placed {
                out.push(JournalRecord::Placed { task: t.id, attempt, node: self.nodes[node as usize].name.clone() });
            }
        }
        let mut zombies: Vec<_> = self.placements.iter().filter(|(_, s)| s.zombie).collect();
        zombies.sort_by_key(|(k, _)| **k);
        for (&(task, attempt), slot) in zombies {
            out.push(JournalRecord::Aborting {
                task,
                attempt,
                node: self.nodes[slot.node as usize].name.clone(),
                demand: Demand {
                    gpu_mem_bytes: slot.need.mem,
                    gpu_slots: slot.need.gpus,
                    cpu_slots: slot.need.cpus,
                    labels: BTreeMap::new(),
                },
            });
        }
        out
    }

    // ---- status ----

    /// Tasks waiting (including those no live node could hold yet).
    pub fn queued_len(&self) -> usize {
        self.queue.len() + self.parked.len()
    }

    /// Tasks placed and not ended.
    pub fn placed_len(&self) -> usize {
        self.tasks.len() - self.queued_len()
    }

    /// A task's status, if it is waiting or placed.
    pub fn task(&self, id: TaskId) -> Option<TaskInfo> {
        let t = self.tasks.get(&id)?;
        let state = match t.state {
            State::Placed { attempt, node, started } => {
                TaskState::Placed { attempt, node: self.nodes[node as usize].name.clone(), started }
            }
            State::Queued | State::Parked { .. } => TaskState::Queued {
                reserved_node: t.reserved.map(|n| self.nodes[n as usize].name.clone()),
                bypasses: t.bypasses,
                bypassed_since_ms: t.bypassed_since,
                unplaceable_since_ms: match t.state {
                    State::Parked { since } => Some(since),
                    _ => None,
                },
            },
        };
        Some(TaskInfo { priority: t.spec.priority, attempts: t.attempts, causes: CauseChain(t.causes.clone()), state })
    }

    /// A waiting or placed task's spec (with its id and retries resolved): what the IO
    /// layer needs to run an attempt.
    pub fn spec(&self, id: TaskId) -> Option<&TaskSpec> {
        self.tasks.get(&id).map(|t| &t.spec)
    }

    /// A node's status, if the scheduler has heard of it.
    pub fn node(&self, name: &str) -> Option<NodeStatus> {
        let node = &self.nodes[*self.node_names.get(name)? as usize];
        Some(NodeStatus {
            live: node.live,
            capacity: node.resources(),
            used: Usage { gpu_mem_bytes: node.used.mem, gpu_slots: node.used.gpus, cpu_slots: node.used.cpus },
            attempts: node.attempts.len(),
            reserved_for: node.reserved_for.map(|(_, t)| t),
        })
    }

    // ---- internals ----

    fn node_index(&mut self, name: &str) -> u32 {
        if let Some(&n) = self.node_names.get(name) {
            return n;
        }
        let n = self.nodes.len() as u32;
        self.nodes.push(Node {
            name: name.to_string(),
            capacity: Amount::default(),
            labels: BTreeMap::new(),
            used: Amount::default(),
            live: false,
            reserved_for: None,
            attempts: BTreeSet::new(),
        });
        self.hot.push(Hot::default());
        self.node_names.insert(name.to_string(), n);
        n
    }

    fn insert_task(&mut self, id: TaskId, seq: u64, at_ms: u64, attempts: u32, causes: Vec<Cause>, spec: TaskSpec) {
        let inputs = spec.inputs.iter().map(|i| (i.node.clone(), i.bytes)).collect::<Vec<_>>();
        let inputs = inputs.into_iter().map(|(name, bytes)| (self.node_index(&name), bytes)).collect();
        if let Some(d) = spec.deadline_ms {
            self.deadlines.insert((d, id));
        }
        let task = Task {
            id,
            need: Amount::of(&spec.demand),
            spec,
            inputs,
            seq,
            submitted_ms: at_ms,
            attempts,
            causes,
            state: State::Queued,
            checked_epoch: None,
            bypasses: 0,
            bypassed_since: None,
            reserved: None,
        };
        self.tasks.insert(id, task);
    }

    /// Puts a task (not in the queue) back in its place, or parks it if no live node could
    /// hold it (unless the caller just checked that one could).
    fn enqueue(&mut self, now_ms: u64, id: TaskId, known_feasible: bool) {
        let Some(task) = self.tasks.get(&id) else { return };
        let feasible = known_feasible || self.feasible(task.need, &task.spec.demand.labels);
        let task = self.tasks.get_mut(&id).expect("task looked up above");
        task.checked_epoch = None;
        task.bypasses = 0;
        task.bypassed_since = None;
        if feasible {
            task.state = State::Queued;
            self.queue.insert(task.key(), id);
            self.dirty = true;
        } else {
            task.state = State::Parked { since: now_ms };
            self.parked.insert(id, now_ms);
        }
    }

    fn feasible(&self, need: Amount, labels: &BTreeMap<String, String>) -> bool {
        self.nodes.iter().any(|n| n.live && n.could_hold(need, labels))
    }

    fn largest_node(&self) -> Option<(String, NodeResources)> {
        self.nodes
            .iter()
            .filter(|n| n.live)
            .max_by_key(|n| (n.capacity.mem, n.capacity.gpus, n.capacity.cpus, Reverse(&n.name)))
            .map(|n| (n.name.clone(), n.resources()))
    }

    /// Node `n` may now take tasks it could not before.
    fn improve(&mut self, n: u32) {
        self.epoch += 1;
        self.improved.push_back((self.epoch, n));
        let keep = 64.max(4 * self.nodes.len());
        while self.improved.len() > keep {
            self.improved.pop_front();
        }
        self.dirty = true;
    }

    fn unreserve(&mut self, n: u32, task: TaskId) {
        let node = &mut self.nodes[n as usize];
        if node.reserved_for.is_some_and(|(_, t)| t == task) {
            node.reserved_for = None;
            self.sync(n);
            self.improve(n);
        }
    }

    fn place(&mut self, key: QueueKey, id: TaskId, n: u32) -> Placement {
        self.queue.remove(&key);
        let task = self.tasks.get_mut(&id).expect("a queued task is in the table");
        task.attempts += 1;
        let attempt = task.attempts;
        task.state = State::Placed { attempt, node: n, started: false };
        task.checked_epoch = None;
        task.bypasses = 0;
        task.bypassed_since = None;
        let reserved = task.reserved.take();
        let need = task.need;
        let node = &mut self.nodes[n as usize];
        node.used = node.used.plus(need);
        node.attempts.insert((id, attempt));
        let name = node.name.clone();
        self.placements.insert((id, attempt), Slot { node: n, need, zombie: false });
        self.sync(n);
        if let Some(r) = reserved {
            self.unreserve(r, id);
        }
        self.journal.push_back(JournalRecord::Placed { task: id, attempt, node: name.clone() });
        Placement { task: id, attempt, node: name }
    }

    /// Frees an attempt's resources.
    fn release(&mut self, task: TaskId, attempt: u32) -> Option<Slot> {
        let slot = self.placements.remove(&(task, attempt))?;
        let node = &mut self.nodes[slot.node as usize];
        node.used = node.used.minus(slot.need);
        node.attempts.remove(&(task, attempt));
        let live = node.live;
        self.sync(slot.node);
        self.journal.push_back(JournalRecord::Released { task, attempt });
        if live {
            self.improve(slot.node);
        }
        Some(slot)
    }

    /// Releases every attempt on node `n`; live tasks among them are retried or failed.
    fn drop_node_attempts(&mut self, now_ms: u64, n: u32, reason: &str) {
        let attempts: Vec<(TaskId, u32)> = self.nodes[n as usize].attempts.iter().copied().collect();
        let name = self.nodes[n as usize].name.clone();
        for (task, attempt) in attempts {
            if let Some(slot) = self.release(task, attempt)
                && !slot.zombie
            {
                let cause = Cause { attempt: Some(attempt), node: Some(name.clone()), reason: reason.to_string() };
                self.retry_or_fail(now_ms, task, cause, true);
            }
        }
    }

    /// After a placed attempt ended without a result (already released).
    fn retry_or_fail(&mut self, now_ms: u64, id: TaskId, cause: Cause, retryable: bool) {
        let Some(task) = self.tasks.get_mut(&id) else { return };
        let budget = task.spec.retries.unwrap_or(0).saturating_add(1);
        if retryable && task.attempts < budget {
            task.causes.push(cause.clone());
            self.journal.push_back(JournalRecord::Requeued { task: id, cause });
            self.enqueue(now_ms, id, false);
        } else {
            self.fail_final(id, cause);
        }
    }

    fn fail_final(&mut self, id: TaskId, cause: Cause) {
        let Some(task) = self.tasks.get_mut(&id) else { return };
        task.causes.push(cause.clone());
        self.end_task(id, Outcome::Failed { cause });
    }

    fn end_task(&mut self, id: TaskId, outcome: Outcome) {
        let Some(task) = self.tasks.remove(&id) else { return };
        let mut abort = None;
        match task.state {
            State::Queued => {
                self.queue.remove(&task.key());
                self.dirty = true;
            }
            State::Parked { .. } => {
                self.parked.remove(&id);
            }
            State::Placed { attempt, node, .. } => {
                if let Some(slot) = self.placements.get_mut(&(id, attempt)) {
                    slot.zombie = true;
                    abort = Some(Event::Abort { task: id, attempt, node: self.nodes[node as usize].name.clone() });
                }
            }
        }
        if let Some(d) = task.spec.deadline_ms {
            self.deadlines.remove(&(d, id));
        }
        if let Some(r) = task.reserved {
            self.unreserve(r, id);
        }
        match &outcome {
            Outcome::Finished { attempt } => self.remember_done(id, *attempt),
            Outcome::Failed { .. } => {
                self.events.push_back(Event::Failed { task: id, causes: CauseChain(task.causes) })
            }
            Outcome::Cancelled => self.events.push_back(Event::Cancelled { task: id }),
            Outcome::Expired => self
                .events
                .push_back(Event::DeadlineExpired { task: id, deadline_ms: task.spec.deadline_ms.unwrap_or_default() }),
        }
        self.events.extend(abort);
        self.journal.push_back(JournalRecord::Ended { task: id, outcome });
    }

    fn remember_done(&mut self, id: TaskId, attempt: u32) {
        if self.config.remember_done == 0 {
            return;
        }
        self.done.push_back(id);
        self.done_attempt.insert(id, attempt);
        while self.done.len() > self.config.remember_done {
            if let Some(old) = self.done.pop_front() {
                self.done_attempt.remove(&old);
            }
        }
    }

    /// Parks waiting tasks for which `affected` holds and no live node could hold.
    fn park_unplaceable(&mut self, now_ms: u64, affected: impl Fn(&Task) -> bool) {
        let ids: Vec<(QueueKey, TaskId)> = self
            .queue
            .iter()
            .filter(|&(_, id)| {
                let t = &self.tasks[id];
                affected(t) && !self.feasible(t.need, &t.spec.demand.labels)
            })
            .map(|(&k, &id)| (k, id))
            .collect();
        for (key, id) in ids {
            self.queue.remove(&key);
            let task = self.tasks.get_mut(&id).expect("a queued task is in the table");
            task.state = State::Parked { since: now_ms };
            if let Some(r) = task.reserved.take() {
                self.unreserve(r, id);
            }
            self.parked.insert(id, now_ms);
            self.dirty = true;
        }
    }

    /// Returns to the queue the parked tasks node `n` could hold.
    fn unpark_for(&mut self, n: u32) {
        let node = &self.nodes[n as usize];
        let ids: Vec<TaskId> = self
            .parked
            .keys()
            .filter(|id| {
                let t = &self.tasks[*id];
                node.could_hold(t.need, &t.spec.demand.labels)
            })
            .copied()
            .collect();
        for id in ids {
            self.parked.remove(&id);
            let task = self.tasks.get_mut(&id).expect("a parked task is in the table");
            task.state = State::Queued;
            task.checked_epoch = None;
            self.queue.insert(task.key(), id);
            self.dirty = true;
        }
    }

    /// Node `n` shrank or lost labels while live.
    fn after_shrink(&mut self, now_ms: u64, n: u32, old: Amount, old_labels: &BTreeMap<String, String>) {
        let node = &self.nodes[n as usize];
        if let Some((_, t)) = node.reserved_for
            && let Some(task) = self.tasks.get(&t)
            && !node.could_hold(task.need, &task.spec.demand.labels)
        {
            self.nodes[n as usize].reserved_for = None;
            self.sync(n);
            if let Some(task) = self.tasks.get_mut(&t) {
                task.reserved = None;
            }
        }
        self.park_unplaceable(now_ms, |t| old.covers(t.need) && labels_match(&t.spec.demand.labels, old_labels));
    }

    fn finish_recovery(&mut self, now_ms: u64) {
        let grace = self.config.recovery_grace_ms;
        for n in 0..self.nodes.len() as u32 {
            let node = &self.nodes[n as usize];
            if node.live || node.attempts.is_empty() {
                continue;
            }
            let reason = format!("node {} did not report within {grace} ms of the scheduler's recovery", node.name);
            self.drop_node_attempts(now_ms, n, &reason);
        }
        self.park_unplaceable(now_ms, |_| true);
    }

    /// Applies one journal record during recovery.
    fn apply(&mut self, record: JournalRecord) -> Result<(), String> {
        match record {
            JournalRecord::Counters { next_task, next_seq } => {
                self.next_id = self.next_id.max(next_task);
                self.next_seq = self.next_seq.max(next_seq);
            }
            JournalRecord::Submitted { task, seq, at_ms, attempts, causes, mut spec } => {
                spec.id = Some(task);
                spec.retries.get_or_insert(self.config.default_retries);
                if self.tasks.contains_key(&task) {
                    return Err(format!("task {task} is submitted while it exists"));
                }
                self.next_id = self.next_id.max(task.0.saturating_add(1));
                self.next_seq = self.next_seq.max(seq.saturating_add(1));
                self.insert_task(task, seq, at_ms, attempts, causes, spec);
                let t = &self.tasks[&task];
                self.queue.insert(t.key(), task);
            }
            JournalRecord::Placed { task, attempt, node } => {
                let n = self.node_index(&node);
                let Some(t) = self.tasks.get_mut(&task) else {
                    return Err(format!("attempt {attempt} of task {task} is placed, but the task does not exist"));
                };
                if t.state != State::Queued || attempt != t.attempts + 1 {
                    return Err(format!(
                        "attempt {attempt} of task {task} is placed, but the task is {:?} after {} attempts",
                        t.state, t.attempts
                    ));
                }
                self.queue.remove(&t.key());
                t.attempts = attempt;
                t.state = State::Placed { attempt, node: n, started: false };
                let need = t.need;
                self.hold(task, attempt, n, need, false);
            }
            JournalRecord::Released { task, attempt } => {
                let Some(slot) = self.placements.remove(&(task, attempt)) else {
                    return Err(format!("attempt {attempt} of task {task} is released, but it holds nothing"));
                };
                let node = &mut self.nodes[slot.node as usize];
                node.used = node.used.minus(slot.need);
                node.attempts.remove(&(task, attempt));
                self.sync(slot.node);
            }
            JournalRecord::Requeued { task, cause } => {
                let Some(t) = self.tasks.get_mut(&task) else {
                    return Err(format!("task {task} is requeued, but it does not exist"));
                };
                let State::Placed { attempt, .. } = t.state else {
                    return Err(format!("task {task} is requeued, but it is not placed"));
                };
                if self.placements.contains_key(&(task, attempt)) {
                    return Err(format!("task {task} is requeued, but attempt {attempt} was not released"));
                }
                t.causes.push(cause);
                t.state = State::Queued;
                self.queue.insert(t.key(), task);
            }
            JournalRecord::Ended { task, outcome } => {
                let Some(t) = self.tasks.remove(&task) else {
                    return Err(format!("task {task} ends, but it does not exist"));
                };
                match t.state {
                    State::Queued | State::Parked { .. } => {
                        self.queue.remove(&t.key());
                    }
                    State::Placed { attempt, .. } => {
                        if let Some(slot) = self.placements.get_mut(&(task, attempt)) {
                            slot.zombie = true;
                        }
                    }
                }
                if let Some(d) = t.spec.deadline_ms {
                    self.deadlines.remove(&(d, task));
                }
                if let Outcome::Finished { attempt } = outcome {
                    self.remember_done(task, attempt);
                }
            }
            JournalRecord::Aborting { task, attempt, node, demand } => {
                if self.placements.contains_key(&(task, attempt)) {
                    return Err(format!("attempt {attempt} of task {task} is aborting, but it is placed"));
                }
                let n = self.node_index(&node);
                self.hold(task, attempt, n, Amount::of(&demand), true);
            }
        }
        Ok(())
    }

    fn hold(&mut self, task: TaskId, attempt: u32, n: u32, need: Amount, zombie: bool) {
        let node = &mut self.nodes[n as usize];
        node.used = node.used.plus(need);
        node.attempts.insert((task, attempt));
        self.placements.insert((task, attempt), Slot { node: n, need, zombie });
        self.sync(n);
    }

    fn sync(&mut self, n: u32) {
        let node = &self.nodes[n as usize];
        self.hot[n as usize] = Hot { free: node.free(), live: node.live, reserved: node.reserved_for.is_some() };
    }
}

/// The node tables a placement scan reads.
struct View<'a> {
    hot: &'a mut [Hot],
    nodes: &'a mut [Node],
    improved: &'a VecDeque<(u64, u32)>,
    epoch: u64,
}

/// The best node that can take `task` now, looking only at nodes improved since the task
/// last found none (the others have only filled up since).
fn find_node(view: &View<'_>, bounds: &mut Vec<(Option<u64>, Amount)>, key: QueueKey, task: &Task) -> Option<u32> {
    let (hot, nodes, improved, epoch) = (&*view.hot, &*view.nodes, view.improved, view.epoch);
    // `None`: check every node (never checked, or more improvements since than nodes or log).
    let since = match task.checked_epoch {
        Some(e) if e == epoch => return None,
        Some(e) if ((epoch - e) as usize) <= improved.len().min(nodes.len()) => Some(e),
        _ => None,
    };
    // Most waiting tasks that fit nowhere are turned away here, without a look at each node.
    let bound = match bounds.iter().find(|(e, _)| *e == since) {
        Some(&(_, b)) => b,
        None => {
            let b = candidates_max(hot, improved, since, epoch);
            bounds.push((since, b));
            b
        }
    };
    let need = task.need;
    if !bound.covers(need) {
        return None;
    }
    let labelled = !task.spec.demand.labels.is_empty();
    let mut best: Option<FitKey> = None;
    let mut consider = |i: u32| {
        let h = hot[i as usize];
        if !h.live || !h.free.covers(need) {
            return;
        }
        let node = &nodes[i as usize];
        if h.reserved
            && let Some((rk, rt)) = node.reserved_for
            && rt != task.id
            && rk < key
        {
            return;
        }
        if labelled && !labels_match(&task.spec.demand.labels, &node.labels) {
            return;
        }
        let local: u64 = task.inputs.iter().filter(|&&(n, _)| n == i).map(|&(_, b)| b).sum();
        let left = h.free.minus(need);
        let k = (Reverse(local), left.mem, left.gpus, left.cpus, i);
        if best.is_none_or(|b| k < b) {
            best = Some(k);
        }
    };
    match since {
        Some(e) => improved.range(improved.len() - (epoch - e) as usize..).for_each(|&(_, i)| consider(i)),
        None => (0..hot.len() as u32).for_each(consider),
    }
    best.map(|k| k.4)
}

/// The componentwise most free among live nodes improved since `since` (all if `None`).
fn candidates_max(hot: &[Hot], improved: &VecDeque<(u64, u32)>, since: Option<u64>, epoch: u64) -> Amount {
    let mut max = Amount::default();
    let mut add = |h: &Hot| {
        if h.live {
            max = Amount {
                mem: max.mem.max(h.free.mem),
                gpus: max.gpus.max(h.free.gpus),
                cpus: max.cpus.max(h.free.cpus),
            };
        }
    };
    match since {
        Some(e) => improved.range(improved.len() - (epoch - e) as usize..).for_each(|&(_, i)| add(&hot[i as usize])),
        None => hot.iter().for_each(add),
    }
    max
}

/// Most input bytes local first, then best fit (least GPU memory left, then GPU slots,
/// then CPU slots), then the lowest node index.
type FitKey = (Reverse<u64>, u64, u32, u32, u32);

/// Reserves for a starving task the live node that could hold it with the smallest
/// shortfall now, preferring nodes no one holds; a node held by a task behind it in queue
/// order may be taken over. Returns the node and the task that lost it.
fn reserve(nodes: &mut [Node], hot: &mut [Hot], key: QueueKey, task: &Task) -> Option<(u32, Option<TaskId>)> {
    let mut best: Option<((bool, u64, u32, u32), u32)> = None;
    for (i, node) in nodes.iter().enumerate() {
        if !node.live || !node.could_hold(task.need, &task.spec.demand.labels) {
            continue;
        }
        if node.reserved_for.is_some_and(|(rk, _)| rk <= key) {
            continue;
        }
        let short = task.need.minus(node.free());
        let k = (node.reserved_for.is_some(), short.mem, short.gpus, short.cpus);
        if best.is_none_or(|(b, _)| k < b) {
            best = Some((k, i as u32));
        }
    }
    let (_, i) = best?;
    let displaced = nodes[i as usize].reserved_for.replace((key, task.id)).map(|(_, t)| t);
    hot[i as usize].reserved = true;
    Some((i, displaced))
}

#[cfg(test)]
impl Scheduler {
    /// Panics if the internal tables disagree with each other (for tests).
    pub(crate) fn check_consistency(&self) {
        let mut used = vec![Amount::default(); self.nodes.len()];
        let mut count = vec![0; self.nodes.len()];
        for (&(task, attempt), slot) in &self.placements {
            used[slot.node as usize] = used[slot.node as usize].plus(slot.need);
            count[slot.node as usize] += 1;
            assert!(
                self.nodes[slot.node as usize].attempts.contains(&(task, attempt)),
                "{task}/{attempt} not on its node"
            );
            if !slot.zombie {
                let t = &self.tasks[&task];
                assert!(matches!(t.state, State::Placed { attempt: a, node, .. } if a == attempt && node == slot.node));
            }
        }
        for (i, node) in self.nodes.iter().enumerate() {
            assert_eq!(node.used, used[i], "node {} used", node.name);
            assert_eq!(node.attempts.len(), count[i]);
            let h = self.hot[i];
            assert_eq!((h.free, h.live, h.reserved), (node.free(), node.live, node.reserved_for.is_some()), "hot {i}");
            if let Some((key, t)) = node.reserved_for {
                let task = &self.tasks[&t];
                assert_eq!((task.reserved, task.key()), (Some(i as u32), key), "reservation of node {}", node.name);
            }
        }
        for (key, id) in &self.queue {
            let t = &self.tasks[id];
            assert_eq!((t.state, t.key()), (State::Queued, *key));
        }
        for (id, &since) in &self.parked {
            assert_eq!(self.tasks[id].state, State::Parked { since });
        }
        for t in self.tasks.values() {
            match t.state {
                State::Queued => assert!(self.queue.contains_key(&t.key())),
                State::Parked { .. } => assert!(self.parked.contains_key(&t.id)),
                State::Placed { attempt, .. } => {
                    assert!(self.placements.get(&(t.id, attempt)).is_some_and(|s| !s.zombie));
                    assert_eq!(t.reserved, None);
                }
            }
            if let Some(r) = t.reserved {
                assert_eq!(self.nodes[r as usize].reserved_for.map(|(_, x)| x), Some(t.id));
            }
            if let Some(d) = t.spec.deadline_ms {
                assert!(self.deadlines.contains(&(d, t.id)));
            }
        }
        assert_eq!(self.deadlines.len(), self.tasks.values().filter(|t| t.spec.deadline_ms.is_some()).count());
    }
}
