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

    /// Fids with this bit are made up by a client for objects it created
    /// while disconnected; reintegration replaces them with the server's.
    pub const LOCAL_BIT: u64 = 1 << 62;

    pub fn local(n: u64) -> Fid {
        Fid(Self::LOCAL_BIT | n)
    }

    pub fn is_local(self) -> bool {
        self.0 & Self::LOCAL_BIT != 0
    }
}

impl fmt::Display for Fid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fid:{}", self.0)
    }
}
