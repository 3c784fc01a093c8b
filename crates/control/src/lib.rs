//! roam-control (stub: being written).
