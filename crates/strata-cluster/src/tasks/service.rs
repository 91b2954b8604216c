//! The scheduler service: the sans-IO scheduler driven by the cluster's membership,
//! its executors and its journal.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use strata_net::{MembershipEvent, NetError, NodeHandle, Service, ServiceFuture, ServiceRequest, ServiceResponse};
use strata_sched::{
    Delivery, Demand, Event, JournalRecord, NodeResources, Scheduler, SchedulerConfig, TaskId, TaskSpec,
};
use tokio::sync::oneshot;

use super::exec::{RunReply, RunRequest, pack, unpack};
use super::journal::Journal;
use super::{EXEC_SERVICE, SCHED_SERVICE, TaskBody, TaskOutcome, TaskResult, TaskRow, decode, encode, now_ms};

/// How the scheduler runs.
#[derive(Clone, Debug)]
pub struct SchedulerOptions {
    /// Where the journal lives (a directory; `scheduler.redb` inside).
    pub journal_dir: PathBuf,
    /// The sans-IO scheduler's settings (queue bound, aging, retries...).
    pub config: SchedulerConfig,
    /// Limit on one attempt when its task has no deadline.
    pub attempt_timeout: Duration,
    /// Finished tasks whose results and rows are kept for submitters and listings.
    pub keep_finished: usize,
}

impl SchedulerOptions {
    /// Defaults with the journal in `journal_dir`.
    pub fn new(journal_dir: impl Into<PathBuf>) -> Self {
        Self {
            journal_dir: journal_dir.into(),
            config: SchedulerConfig::default(),
            attempt_timeout: Duration::from_secs(600),
            keep_finished: 100_000,
        }
    }
}

/// A submitter's request.
#[derive(Serialize, Deserialize)]
pub(crate) enum SchedRequest {
    Submit {
        body: TaskBody,
        priority: i32,
        demand: Demand,
        deadline_ms: Option<u64>,
        retries: Option<u32>,
        near: Vec<(String, u64)>,
    },
    Wait {
        task: TaskId,
        timeout_ms: u64,
    },
    Cancel {
        task: TaskId,
    },
    List,
}

/// The scheduler's answer.
#[derive(Serialize, Deserialize)]
pub(crate) enum SchedReply {
    Submitted(TaskId),
    /// `None`: not ended within the wait.
    Outcome(Option<TaskOutcome>),
    Cancelled,
    Rows(Vec<TaskRow>),
}

/// The scheduler service (`"sched"`), registered on the scheduler's node.
pub struct SchedulerService {
    actor: Addr<SchedActor>,
}

impl SchedulerService {
    /// Opens (or recovers) the journal and starts the scheduler on `node`, inside the
    /// running actix system. Every queued and running task of the journal is back, and
    /// nodes are asked for their resources as they are seen.
    pub async fn start(node: &NodeHandle, options: SchedulerOptions) -> Result<Arc<Self>, String> {
        let (mut journal, rec) = Journal::open(&options.journal_dir)?;
        let now = now_ms();
        let recovered = !rec.records.is_empty();
        // A fresh journal starts a fresh scheduler; a recovered one waits a grace period
        // for nodes to report before judging demands infeasible.
        let sched = if recovered {
            Scheduler::recover(options.config.clone(), rec.records, now).map_err(|e| e.to_string())?
        } else {
            Scheduler::new(options.config.clone())
        };
        journal.compact(&sched.snapshot(), options.keep_finished)?;
        if recovered {
            tracing::info!(
                "scheduler recovered {} queued and {} running tasks from {}",
                sched.queued_len(),
                sched.placed_len(),
                options.journal_dir.display()
            );
        }
        let actor = SchedActor {
            node: node.clone(),
            sched,
            journal,
            results: rec.results,
            rows: rec.rows,
            waiters: HashMap::new(),
            inflight: HashSet::new(),
            pending: Pending::default(),
            last_flush: std::time::Instant::now(),
            options,
        }
        .start();
        let svc = Arc::new(Self { actor });
        node.register_service(SCHED_SERVICE, svc.clone());
        // Membership drives node_up / node_lost.
        let mut events = node.subscribe().await.map_err(|e| e.to_string())?;
        for info in node.alive().await.map_err(|e| e.to_string())? {
            svc.actor.do_send(NodeSeen(info.name));
        }
        let addr = svc.actor.clone();
        actix::spawn(async move {
            while let Some(ev) = events.recv().await {
                match ev {
                    MembershipEvent::Joined(i) => addr.do_send(NodeSeen(i.name)),
                    MembershipEvent::Failed { name, .. } | MembershipEvent::Left(name) => addr.do_send(NodeGone(name)),
                }
            }
        });
        Ok(svc)
    }

    /// Stops the scheduler (its journal stays; a new one recovers from it).
    pub async fn stop(&self) {
        let _ = self.actor.send(StopSched).await;
    }
}

impl Service for SchedulerService {
    fn call(&self, request: ServiceRequest) -> ServiceFuture {
        let actor = self.actor.clone();
        Box::pin(async move {
            let req: SchedRequest = unpack(&request.payload).and_then(|b| decode(&b))?;
            let reply = match req {
                SchedRequest::Wait { task, timeout_ms } => {
                    let waiting = actor.send(Wait(task)).await.map_err(|_| "the scheduler stopped")??;
                    let outcome = match waiting {
                        Waiting::Done(o) => Some(o),
                        Waiting::Pending(rx) => {
                            tokio::time::timeout(Duration::from_millis(timeout_ms), rx).await.ok().and_then(Result::ok)
                        }
                    };
                    SchedReply::Outcome(outcome)
                }
                other => match actor.send(Request(other)).await.map_err(|_| "the scheduler stopped")?? {
                    Answer::Now(r) => r,
                    Answer::Later(rx) => rx.await.map_err(|_| "the scheduler stopped before journalling")?,
                },
            };
            Ok(ServiceResponse { data: Vec::new(), payload: pack(&encode(&reply)) })
        })
    }
}

struct SchedActor {
    node: NodeHandle,
    sched: Scheduler,
    journal: Journal,
    results: BTreeMap<TaskId, TaskOutcome>,
    rows: BTreeMap<TaskId, TaskRow>,
    waiters: HashMap<TaskId, Vec<oneshot::Sender<TaskOutcome>>>,
    /// Attempts sent to executors whose report this scheduler still waits for.
    inflight: HashSet<(TaskId, u32)>,
    pending: Pending,
    last_flush: std::time::Instant,
    options: SchedulerOptions,
}

impl Actor for SchedActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(Duration::from_millis(50), |act, ctx| {
            act.sched.tick(now_ms());
            act.drive(ctx);
        });
    }
}

/// Decisions taken since the last commit, carried out once they are durable.
#[derive(Default)]
struct Pending {
    records: Vec<JournalRecord>,
    results: Vec<(TaskId, TaskOutcome)>,
    rows: Vec<TaskId>,
    placements: Vec<strata_sched::Placement>,
    replies: Vec<(oneshot::Sender<SchedReply>, SchedReply)>,
    /// A flush is scheduled.
    scheduled: bool,
}

/// How long decisions may wait to share one durable commit (group commit): each commit
/// costs an fsync, which would otherwise cap the queue at a few hundred tasks a second.
const GROUP_COMMIT: Duration = Duration::from_millis(2);

impl SchedActor {
    /// Collects what the scheduler decided; [`SchedActor::flush`] journals it, then
    /// carries it out.
    fn drive(&mut self, ctx: &mut Context<Self>) {
        let now = now_ms();
        while let Some(p) = self.sched.poll_placement(now) {
            if let Some(row) = self.rows.get_mut(&p.task) {
                row.state = "running".into();
                row.node = Some(p.node.clone());
                row.attempts = p.attempt;
                row.wait_ms = now.saturating_sub(row.submitted_ms);
                row.run_ms = Some(0);
            }
            self.pending.placements.push(p);
        }
        let mut ended: Vec<(TaskId, TaskOutcome)> = Vec::new();
        while let Some(ev) = self.sched.poll_event() {
            match ev {
                Event::Failed { task, causes } => ended.push((task, TaskOutcome::Failed(causes.to_string()))),
                Event::DeadlineExpired { task, .. } => ended.push((task, TaskOutcome::Expired)),
                Event::Cancelled { task } => ended.push((task, TaskOutcome::Cancelled)),
                // The attempt runs on; its late report is dropped. Its resources stay held
                // until then, so the node is not over-committed.
                Event::Abort { task, attempt, node } => {
                    tracing::info!("task {task} attempt {attempt} on {node} is no longer wanted")
                }
            }
        }
        for (task, outcome) in ended {
            self.ended(now, task, outcome);
        }
        while let Some(r) = self.sched.poll_journal() {
            self.pending.records.push(r);
        }
        if !self.pending.scheduled {
            self.pending.scheduled = true;
            // Idle: commit at once (latency). Busy: let decisions gather for a moment so
            // that one commit covers many (throughput).
            if self.last_flush.elapsed() >= GROUP_COMMIT {
                ctx.notify(Flush);
            } else {
                ctx.run_later(GROUP_COMMIT, |act, ctx| act.flush(ctx));
            }
        }
    }

    /// Records a task's end (its row and result are journalled with the next commit).
    fn ended(&mut self, now: u64, task: TaskId, outcome: TaskOutcome) {
        if let Some(row) = self.rows.get_mut(&task) {
            row.state = match outcome {
                TaskOutcome::Finished(_) => "finished",
                TaskOutcome::Failed(_) => "failed",
                TaskOutcome::Expired => "expired",
                TaskOutcome::Cancelled => "cancelled",
            }
            .into();
            if row.run_ms.is_some() {
                row.run_ms = Some(now.saturating_sub(row.submitted_ms + row.wait_ms));
            }
            self.pending.rows.push(task);
        }
        self.pending.results.push((task, outcome));
    }

    /// Journals everything pending in one durable transaction, then acts on it: answers
    /// submitters, wakes waiters and sends attempts to executors.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        self.last_flush = std::time::Instant::now();
        let p = std::mem::take(&mut self.pending);
        let rows: Vec<&TaskRow> = p.rows.iter().filter_map(|t| self.rows.get(t)).collect();
        if let Err(e) = self.journal.commit(&p.records, &p.results, &rows) {
            // Without its journal the scheduler cannot promise anything: stop rather than
            // act on decisions a restart would not know.
            tracing::error!("scheduler on {}: {e}; stopping", self.node.name());
            std::process::abort();
        }
        for (tx, reply) in p.replies {
            let _ = tx.send(reply);
        }
        for (task, outcome) in p.results {
            for w in self.waiters.remove(&task).unwrap_or_default() {
                let _ = w.send(outcome.clone());
            }
            self.results.insert(task, outcome);
        }
        while self.results.len() > self.options.keep_finished {
            self.results.pop_first();
        }
        let now = now_ms();
        for pl in p.placements {
            self.dispatch(ctx, pl.task, pl.attempt, pl.node, now);
        }
        if self.journal.since_compaction > 10_000 {
            let snap = self.sched.snapshot();
            if let Err(e) = self.journal.compact(&snap, self.options.keep_finished) {
                tracing::warn!("compacting the journal: {e}");
            }
        }
    }

    /// Sends an attempt to its node's executor; its report comes back as `AttemptEnded`.
    fn dispatch(&mut self, ctx: &mut Context<Self>, task: TaskId, attempt: u32, node_name: String, now: u64) {
        let Some(spec) = self.spec_of(task) else { return };
        if !self.inflight.insert((task, attempt)) {
            return;
        }
        let body: TaskBody = match decode(&spec.payload) {
            Ok(b) => b,
            Err(e) => {
                ctx.address().do_send(AttemptEnded {
                    task,
                    attempt,
                    reply: Ok(RunReply::Failed { message: format!("undecodable task: {e}"), retryable: false }),
                });
                return;
            }
        };
        let limit = spec
            .deadline_ms
            .map_or(self.options.attempt_timeout, |d| Duration::from_millis(d.saturating_sub(now).max(1)));
        let payload = pack(&encode(&RunRequest { task, attempt, body }));
        let (node, me) = (self.node.clone(), ctx.address());
        actix::spawn(async move {
            let reply = match node.call(&node_name, EXEC_SERVICE, "run", Vec::new(), &payload, limit).await {
                Ok(r) => unpack(&r.payload).and_then(|b| decode::<RunReply>(&b)),
                Err(e @ (NetError::NotConnected(_) | NetError::ConnectionLost { .. } | NetError::NodeGone)) => {
                    // The node is unreachable: stop placing work there (each attempt would
                    // fail at once and burn its task's retries) until it answers again.
                    me.do_send(Unreachable(node_name.clone()));
                    Err(e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            me.do_send(AttemptEnded { task, attempt, reply });
        });
    }

    fn spec_of(&self, task: TaskId) -> Option<TaskSpec> {
        self.sched.spec(task).cloned()
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Flush;

impl Handler<Flush> for SchedActor {
    type Result = ();
    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) {
        self.flush(ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct NodeSeen(String);

impl Handler<NodeSeen> for SchedActor {
    type Result = ();
    fn handle(&mut self, msg: NodeSeen, ctx: &mut Context<Self>) {
        let (node, me) = (self.node.clone(), ctx.address());
        actix::spawn(async move {
            match node.call(&msg.0, EXEC_SERVICE, "resources", Vec::new(), &[], Duration::from_secs(10)).await {
                Ok(r) => match decode::<NodeResources>(&r.data) {
                    Ok(res) => me.do_send(NodeUp(msg.0, res)),
                    Err(e) => tracing::warn!("node {}: undecodable resources: {e}", msg.0),
                },
                Err(e) => tracing::info!("node {} runs no executor: {e}", msg.0),
            }
        });
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct NodeUp(String, NodeResources);

impl Handler<NodeUp> for SchedActor {
    type Result = ();
    fn handle(&mut self, msg: NodeUp, ctx: &mut Context<Self>) {
        tracing::info!("executor {} offers {:?}", msg.0, msg.1);
        let now = now_ms();
        self.sched.node_up(now, &msg.0, msg.1);
        // Attempts recovered from the journal that nobody waits for are sent again: the
        // same attempt number, so whichever report comes first counts and the other is a
        // duplicate (tasks run at least once, their results are delivered exactly once).
        let orphans: Vec<(TaskId, u32)> = self
            .sched
            .snapshot()
            .into_iter()
            .filter_map(|r| match r {
                JournalRecord::Placed { task, attempt, node } if node == msg.0 => Some((task, attempt)),
                _ => None,
            })
            .filter(|k| !self.inflight.contains(k))
            .collect();
        for (task, attempt) in orphans {
            tracing::info!("sending task {task} attempt {attempt} to {} again after a restart", msg.0);
            self.dispatch(ctx, task, attempt, msg.0.clone(), now);
        }
        self.drive(ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct NodeGone(String);

impl Handler<NodeGone> for SchedActor {
    type Result = ();
    fn handle(&mut self, msg: NodeGone, ctx: &mut Context<Self>) {
        tracing::warn!("node {} is gone: its attempts go back to the queue", msg.0);
        self.sched.node_lost(now_ms(), &msg.0);
        self.drive(ctx);
    }
}

/// An executor could not be reached: its node is treated as lost, and probed again in a
/// second (membership brings it back too when it rejoins).
#[derive(Message)]
#[rtype(result = "()")]
struct Unreachable(String);

impl Handler<Unreachable> for SchedActor {
    type Result = ();
    fn handle(&mut self, msg: Unreachable, ctx: &mut Context<Self>) {
        if self.sched.node(&msg.0).is_some_and(|n| n.live) {
            tracing::warn!("node {} is unreachable: its attempts go back to the queue", msg.0);
            self.sched.node_lost(now_ms(), &msg.0);
            self.drive(ctx);
            ctx.run_later(Duration::from_secs(1), move |_, ctx| ctx.address().do_send(NodeSeen(msg.0)));
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct AttemptEnded {
    task: TaskId,
    attempt: u32,
    reply: Result<RunReply, String>,
}

impl Handler<AttemptEnded> for SchedActor {
    type Result = ();
    fn handle(&mut self, msg: AttemptEnded, ctx: &mut Context<Self>) {
        let now = now_ms();
        // Deadlines first: an attempt cut off by its task's deadline expires the task
        // rather than failing an attempt.
        self.sched.tick(now);
        self.inflight.remove(&(msg.task, msg.attempt));
        let node = self.rows.get(&msg.task).and_then(|r| r.node.clone()).unwrap_or_default();
        let delivery = match msg.reply {
            Ok(RunReply::Finished { data, tensors }) => {
                let d = self.sched.task_finished(now, msg.task, msg.attempt);
                if d == Delivery::Deliver {
                    let result = TaskResult { node, attempt: msg.attempt, data, tensors };
                    self.ended(now, msg.task, TaskOutcome::Finished(result));
                }
                d
            }
            Ok(RunReply::Failed { message, retryable }) => {
                self.sched.task_failed(now, msg.task, msg.attempt, message, retryable)
            }
            // The call failed (the node is unreachable or too slow): another attempt may succeed.
            Err(e) => self.sched.task_failed(now, msg.task, msg.attempt, e, true),
        };
        if delivery != Delivery::Deliver {
            tracing::info!("dropped the {delivery:?} report of task {} attempt {}", msg.task, msg.attempt);
        }
        self.drive(ctx);
    }
}

enum Waiting {
    Done(TaskOutcome),
    Pending(oneshot::Receiver<TaskOutcome>),
}

#[derive(Message)]
#[rtype(result = "Result<Waiting, String>")]
struct Wait(TaskId);

impl Handler<Wait> for SchedActor {
    type Result = Result<Waiting, String>;
    fn handle(&mut self, msg: Wait, _: &mut Context<Self>) -> Self::Result {
        if let Some(o) = self.results.get(&msg.0) {
            return Ok(Waiting::Done(o.clone()));
        }
        // A task that just ended waits for the next commit with its result pending.
        let ending = self.pending.results.iter().any(|(t, _)| *t == msg.0);
        if self.sched.task(msg.0).is_none() && !ending {
            return Err(format!("no task {} (never submitted, or ended too long ago)", msg.0));
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.entry(msg.0).or_default().push(tx);
        Ok(Waiting::Pending(rx))
    }
}

/// An answer now, or once the next commit is durable.
enum Answer {
    Now(SchedReply),
    Later(oneshot::Receiver<SchedReply>),
}

#[derive(Message)]
#[rtype(result = "Result<Answer, String>")]
struct Request(SchedRequest);

impl Handler<Request> for SchedActor {
    type Result = Result<Answer, String>;
    fn handle(&mut self, msg: Request, ctx: &mut Context<Self>) -> Self::Result {
        let now = now_ms();
        let reply = match msg.0 {
            SchedRequest::Submit { body, priority, demand, deadline_ms, retries, near } => {
                let label = body.label();
                let mut spec = TaskSpec::new(label.clone()).payload(encode(&body)).priority(priority).demand(demand);
                if let Some(d) = deadline_ms {
                    spec = spec.deadline_ms(now.saturating_add(d));
                }
                if let Some(r) = retries {
                    spec = spec.retries(r);
                }
                for (node, bytes) in near {
                    spec = spec.input(node, bytes);
                }
                let id = self.sched.submit(now, spec).map_err(|e| e.to_string())?;
                let row = TaskRow {
                    id,
                    label,
                    priority,
                    state: "queued".into(),
                    node: None,
                    attempts: 0,
                    submitted_ms: now,
                    wait_ms: 0,
                    run_ms: None,
                };
                self.rows.insert(id, row);
                while self.rows.len() > self.options.keep_finished {
                    self.rows.pop_first();
                }
                // The submitter hears its id once the submission is journalled.
                self.pending.rows.push(id);
                let (tx, rx) = oneshot::channel();
                self.pending.replies.push((tx, SchedReply::Submitted(id)));
                self.drive(ctx);
                return Ok(Answer::Later(rx));
            }
            SchedRequest::Cancel { task } => {
                self.sched.cancel(now, task).map_err(|e| e.to_string())?;
                self.drive(ctx);
                SchedReply::Cancelled
            }
            SchedRequest::List => {
                let mut rows: Vec<TaskRow> = self.rows.values().cloned().collect();
                for r in &mut rows {
                    if r.state == "queued" {
                        r.wait_ms = now.saturating_sub(r.submitted_ms);
                    } else if r.state == "running" {
                        r.run_ms = Some(now.saturating_sub(r.submitted_ms + r.wait_ms));
                    }
                }
                SchedReply::Rows(rows)
            }
            SchedRequest::Wait { .. } => return Err("wait is answered by the service".into()),
        };
        Ok(Answer::Now(reply))
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct StopSched;

impl Handler<StopSched> for SchedActor {
    type Result = ();
    fn handle(&mut self, _: StopSched, ctx: &mut Context<Self>) {
        self.node.unregister_service(SCHED_SERVICE);
        ctx.stop();
    }
}
