//! Everything afsd and venus share: identifiers, version vectors, attributes,
//! errors, the protocol (defined once in [`proto`]), framing, authentication
//! and the RPC layer.

pub mod attr;
pub mod auth;
pub mod error;
pub mod fid;
pub mod frame;
pub mod proto;
pub mod rpc;
pub mod version_vector;

/// Bulk data moves in 1 MiB buffers. glibc would serve each from a fresh
/// mmap and unmap it on free (page faults on every chunk); keeping such
/// buffers on the heap and not trimming it eagerly makes transfers several
/// times cheaper. Memory stays bounded by the transfer windows. Call once at
/// the start of a binary.
pub fn tune_allocator() {
    // SAFETY: mallopt only adjusts allocator thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

pub use attr::{Attr, DirEntry, FileKind, FsStats, SetAttr, Timestamp};
pub use error::FsError;
pub use fid::Fid;
pub use version_vector::{VersionVector, VvOrder};
