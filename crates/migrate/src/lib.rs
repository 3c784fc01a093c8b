//! roam-migrate (stub: being written).
