//! roam-nbd (stub: being written).
