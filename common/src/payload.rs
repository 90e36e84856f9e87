//! The bulk bytes a chunk reply carries after its encoded body.
//!
//! A receiver always gets bytes in memory. A sender may instead name a range
//! of an open file: the server's chunk replies do, and the connection's
//! writer hands the range to `sendfile(2)`, so the kernel moves the file's
//! cached pages into the socket. The bytes then never pass through the
//! server's memory: a read into a buffer and a send out of it would be two
//! copies of every byte of a fetch.

use bytes::Bytes;
use std::fs::File;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub enum Payload {
    /// Bytes in memory: what a receiver always gets.
    Bytes(Bytes),
    /// A range of an open file, read only when it is sent.
    File(FileSlice),
}

/// `len` bytes of `file` from `offset`. The sender checked that the file
/// held them; if it shrinks before they are sent, the connection is closed
/// rather than sending fewer bytes than the frame announced.
#[derive(Clone, Debug)]
pub struct FileSlice {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: usize,
}

impl Payload {
    pub fn len(&self) -> usize {
        match self {
            Payload::Bytes(b) => b.len(),
            Payload::File(s) => s.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of a received payload. `None` for a file range, which only
    /// a sender holds.
    pub fn into_bytes(self) -> Option<Bytes> {
        match self {
            Payload::Bytes(b) => Some(b),
            Payload::File(_) => None,
        }
    }
}

impl Default for Payload {
    fn default() -> Self {
        Payload::Bytes(Bytes::new())
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        Payload::Bytes(b)
    }
}
