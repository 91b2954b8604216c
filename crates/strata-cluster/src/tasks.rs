//! The cluster task queue service (being written).
