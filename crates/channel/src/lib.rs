//! roam-channel (stub: being written).
