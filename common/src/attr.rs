//! Object attributes and the small value types that travel with them.

use crate::fid::Fid;
use crate::version_vector::VersionVector;
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
}

/// A point in time with nanosecond precision, independent of the platform.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        SystemTime::now().into()
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp { secs: d.as_secs() as i64, nanos: d.subsec_nanos() },
            Err(e) => {
                let d = e.duration();
                if d.subsec_nanos() == 0 {
                    Timestamp { secs: -(d.as_secs() as i64), nanos: 0 }
                } else {
                    Timestamp { secs: -(d.as_secs() as i64) - 1, nanos: 1_000_000_000 - d.subsec_nanos() }
                }
            }
        }
    }
}

impl Timestamp {
    /// Whether the value is a real point in time (nanoseconds in range,
    /// seconds within ±10^12, far beyond any file time).
    pub fn is_valid(&self) -> bool {
        self.nanos < 1_000_000_000 && self.secs.unsigned_abs() < 1_000_000_000_000
    }
}

/// Never panics: out-of-range values saturate (the server refuses them
/// before they get here; see `Timestamp::is_valid`).
impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> Self {
        let nanos = Duration::from_nanos(t.nanos.min(999_999_999) as u64);
        let t = if t.secs >= 0 {
            UNIX_EPOCH.checked_add(Duration::from_secs(t.secs as u64)).and_then(|s| s.checked_add(nanos))
        } else {
            UNIX_EPOCH.checked_sub(Duration::from_secs(t.secs.unsigned_abs())).and_then(|s| s.checked_add(nanos))
        };
        t.unwrap_or(UNIX_EPOCH)
    }
}

/// Everything a client needs to answer `stat` without asking again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub fid: Fid,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (the low 12 bits of st_mode).
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    /// Bumped by every change to this object, so caches can tell staleness.
    pub version: VersionVector,
}

/// Attribute changes requested by `setattr`; `None` leaves a field alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Timestamp>,
    pub mtime: Option<Timestamp>,
}

impl SetAttr {
    pub fn is_empty(&self) -> bool {
        *self == SetAttr::default()
    }
}

/// One name in a directory listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub fid: Fid,
    pub kind: FileKind,
}

/// Filesystem usage, as statfs reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsStats {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_timestamps_do_not_panic() {
        for t in [Timestamp { secs: i64::MAX, nanos: 1_500_000_000 }, Timestamp { secs: i64::MIN, nanos: u32::MAX }] {
            assert!(!t.is_valid());
            let _: SystemTime = t.into();
        }
    }

    #[test]
    fn timestamps_round_trip_through_system_time() {
        for t in [
            Timestamp { secs: 0, nanos: 0 },
            Timestamp { secs: 1_700_000_000, nanos: 123_456_789 },
            Timestamp { secs: -5, nanos: 250_000_000 },
        ] {
            let st: SystemTime = t.into();
            assert_eq!(Timestamp::from(st), t);
        }
    }
}
