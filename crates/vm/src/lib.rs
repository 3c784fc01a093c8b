//! roam-vm (stub: being written).
