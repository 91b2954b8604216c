//! The submitter's side of the task queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_net::{NodeHandle, OperatorClient};

use super::exec::{pack, unpack};
use super::service::{SchedReply, SchedRequest};
use super::{SCHED_SERVICE, TaskError, TaskId, TaskOutcome, TaskRequest, TaskRow, decode, encode};

#[derive(Clone)]
enum Link {
    /// From a member node, to the scheduler's node by name.
    Member { node: Box<NodeHandle>, scheduler: String },
    /// From an operator connected to the scheduler's node.
    Operator(Arc<OperatorClient>),
}

/// Submits tasks and waits for their outcomes. Cheap to clone.
#[derive(Clone)]
pub struct TaskClient {
    link: Link,
    /// Limit on each call to the scheduler.
    pub call_timeout: Duration,
}

impl TaskClient {
    /// A client on member `node` for the scheduler running on node `scheduler`.
    pub fn member(node: NodeHandle, scheduler: &str) -> Self {
        Self {
            link: Link::Member { node: Box::new(node), scheduler: scheduler.to_string() },
            call_timeout: Duration::from_secs(30),
        }
    }

    /// A client through an operator connection to the scheduler's node.
    pub fn operator(client: Arc<OperatorClient>) -> Self {
        Self { link: Link::Operator(client), call_timeout: Duration::from_secs(30) }
    }

    fn scheduler(&self) -> String {
        match &self.link {
            Link::Member { scheduler, .. } => scheduler.clone(),
            Link::Operator(c) => c.node().name.clone(),
        }
    }

    async fn ask(&self, req: SchedRequest, limit: Duration) -> Result<SchedReply, TaskError> {
        let payload = pack(&encode(&req));
        let r = match &self.link {
            Link::Member { node, scheduler } => {
                node.call(scheduler, SCHED_SERVICE, "request", Vec::new(), &payload, limit).await
            }
            Link::Operator(c) => c.call(SCHED_SERVICE, "request", Vec::new(), &payload, limit).await,
        };
        let r = r.map_err(|e| match e {
            strata_net::NetError::Refused { peer, message } => TaskError::Refused { node: peer, message },
            other => TaskError::Net(other),
        })?;
        unpack(&r.payload)
            .and_then(|b| decode(&b))
            .map_err(|reason| TaskError::Protocol { node: self.scheduler(), reason })
    }

    fn unexpected(&self, what: &str) -> TaskError {
        TaskError::Protocol { node: self.scheduler(), reason: format!("unexpected answer to {what}") }
    }

    /// Submits a task; returns its id once the scheduler has journalled it.
    pub async fn submit(&self, task: TaskRequest) -> Result<TaskId, TaskError> {
        let req = SchedRequest::Submit {
            body: task.body,
            priority: task.priority,
            demand: task.demand,
            deadline_ms: task.deadline_ms,
            retries: task.retries,
            near: task.near,
        };
        match self.ask(req, self.call_timeout).await? {
            SchedReply::Submitted(id) => Ok(id),
            _ => Err(self.unexpected("submit")),
        }
    }

    /// Waits up to `timeout` for task `id` to end; works across scheduler restarts
    /// (reattach by id).
    pub async fn wait(&self, id: TaskId, timeout: Duration) -> Result<TaskOutcome, TaskError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Long polls of at most 10 s, each bounded on both ends.
            let poll = left.min(Duration::from_secs(10));
            let req = SchedRequest::Wait { task: id, timeout_ms: poll.as_millis() as u64 };
            match self.ask(req, poll + self.call_timeout).await {
                Ok(SchedReply::Outcome(Some(o))) => return Ok(o),
                Ok(SchedReply::Outcome(None)) => {}
                Ok(_) => return Err(self.unexpected("wait")),
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(TaskError::Timeout { task: id, millis: timeout.as_millis() as u64 });
            }
        }
    }

    /// Submits a task and waits for its outcome.
    pub async fn run(&self, task: TaskRequest, timeout: Duration) -> Result<TaskOutcome, TaskError> {
        let id = self.submit(task).await?;
        self.wait(id, timeout).await
    }

    /// Cancels a waiting or running task.
    pub async fn cancel(&self, id: TaskId) -> Result<(), TaskError> {
        match self.ask(SchedRequest::Cancel { task: id }, self.call_timeout).await? {
            SchedReply::Cancelled => Ok(()),
            _ => Err(self.unexpected("cancel")),
        }
    }

    /// Queued, running and recently finished tasks.
    pub async fn list(&self) -> Result<Vec<TaskRow>, TaskError> {
        match self.ask(SchedRequest::List, self.call_timeout).await? {
            SchedReply::Rows(r) => Ok(r),
            _ => Err(self.unexpected("list")),
        }
    }
}
