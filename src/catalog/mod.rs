//! Catalog: volume records, the snapshot/clone tree, leases and fencing.
