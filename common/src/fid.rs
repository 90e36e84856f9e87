//! File identifiers: the name of an object that survives renames and restarts.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A file identifier. The server allocates fids; they are never reused, so a
/// client holding a stale fid gets `Stale`/`NotFound` instead of another file.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fid(pub u64);

impl Fid {
    /// The root directory of the volume.
    pub const ROOT: Fid = Fid(1);
}

impl fmt::Display for Fid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fid:{}", self.0)
    }
}
