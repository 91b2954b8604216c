//! Cluster compute for applications: the task queue, remote GPU actors and map-reduce.

mod mapreduce;
mod remote_gpu;
mod tasks;
