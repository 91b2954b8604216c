//! Cluster compute for applications: the task queue (and remote GPU actors).

mod mapreduce;
mod tasks;
