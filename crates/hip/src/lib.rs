//! roam-hip (stub: being written).
