//! Leader election on a Lease, with a local deadline checked before every write.
