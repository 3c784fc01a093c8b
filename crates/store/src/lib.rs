//! roam-store (stub: being written).
