//! Cluster compute for applications: remote GPU actors across in-process clusters.

mod remote_gpu;
