//! roam-vlan (stub: being written).
