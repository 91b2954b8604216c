//! Cluster compute for applications: the task queue and remote GPU actors.

mod remote_gpu;
mod tasks;
