//! roam-agent (stub: being written).
