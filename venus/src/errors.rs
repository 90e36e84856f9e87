//! Errors of the cache manager, each mapped to the errno a program expects.

use common::rpc::RpcError;
use common::FsError;
use fuser::Errno;

/// One exhaustive mapping from what went wrong to what the kernel is told.
pub trait ToErrno {
    fn errno(&self) -> Errno;
}

impl ToErrno for FsError {
    fn errno(&self) -> Errno {
        Errno::from_i32(FsError::errno(self))
    }
}

impl ToErrno for RpcError {
    fn errno(&self) -> Errno {
        match self {
            RpcError::Fs(e) => ToErrno::errno(e),
            // The server is away: the operation could not be done now.
            RpcError::Timeout(_) => Errno::from_i32(libc::ETIMEDOUT),
            RpcError::Unreachable(_) => Errno::from_i32(libc::EHOSTUNREACH),
            RpcError::Refused(_) => Errno::EACCES,
            RpcError::Protocol(_) => Errno::EIO,
        }
    }
}

impl ToErrno for std::io::Error {
    fn errno(&self) -> Errno {
        Errno::from_i32(self.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// Errors inside venus carry their errno with them.
#[derive(Debug, thiserror::Error)]
pub enum VenusError {
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("cache I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("cache index: {0}")]
    Index(#[from] sled::Error),
    #[error("{1}")]
    Errno(Errno, String),
    /// Disconnected, and what was asked for is not cached.
    #[error("the server is unreachable and the object is not cached")]
    Offline,
}

impl ToErrno for VenusError {
    fn errno(&self) -> Errno {
        match self {
            VenusError::Rpc(e) => e.errno(),
            VenusError::Fs(e) => ToErrno::errno(e),
            VenusError::Io(e) => e.errno(),
            VenusError::Index(_) => Errno::EIO,
            VenusError::Errno(e, _) => *e,
            VenusError::Offline => Errno::from_i32(libc::ETIMEDOUT),
        }
    }
}

pub type Result<T> = std::result::Result<T, VenusError>;

pub fn errno(e: i32, why: impl Into<String>) -> VenusError {
    VenusError::Errno(Errno::from_i32(e), why.into())
}
