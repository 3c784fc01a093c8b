//! roam-wan (stub: being written).
