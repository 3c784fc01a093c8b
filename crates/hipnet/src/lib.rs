//! roam-hipnet (stub: being written).
