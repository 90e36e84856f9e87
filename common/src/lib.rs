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

pub use attr::{Attr, DirEntry, FileKind, FsStats, SetAttr, Timestamp};
pub use error::FsError;
pub use fid::Fid;
pub use version_vector::{VersionVector, VvOrder};
