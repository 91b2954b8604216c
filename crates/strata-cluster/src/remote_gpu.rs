//! Remote GPU actors (being written).
