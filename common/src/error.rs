//! Error kinds shared by server and client, each mapping to exactly one errno.

use crate::attr::Attr;
use serde::{Deserialize, Serialize};

/// A filesystem error as it crosses the wire. Every variant maps to one errno
/// in [`FsError::errno`], so venus can hand the kernel what a program expects.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid name: {0}")]
    InvalidName(String),
    #[error("name too long")]
    NameTooLong,
    #[error("permission denied")]
    Access,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("stale file handle")]
    Stale,
    /// A store or namespace change based on a version the server no longer
    /// has: the current attributes are returned so the client can flag it.
    #[error("conflict: object changed on the server")]
    Conflict(Box<Attr>),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no space left on device")]
    NoSpace,
    #[error("file too large")]
    TooBig,
    #[error("too many symbolic links")]
    Loop,
    #[error("cross-device link")]
    CrossDevice,
    #[error("operation not supported: {0}")]
    NotSupported(String),
    #[error("I/O error: {0}")]
    Io(String),
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::InvalidName(_) => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Access => libc::EACCES,
            FsError::NotPermitted => libc::EPERM,
            FsError::Stale => libc::ESTALE,
            FsError::Conflict(_) => libc::EIO,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NoSpace => libc::ENOSPC,
            FsError::TooBig => libc::EFBIG,
            FsError::Loop => libc::ELOOP,
            FsError::CrossDevice => libc::EXDEV,
            FsError::NotSupported(_) => libc::EOPNOTSUPP,
            FsError::Io(_) => libc::EIO,
        }
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOENT) => FsError::NotFound,
            Some(libc::EEXIST) => FsError::Exists,
            Some(libc::ENOTDIR) => FsError::NotDir,
            Some(libc::EISDIR) => FsError::IsDir,
            Some(libc::ENOTEMPTY) => FsError::NotEmpty,
            Some(libc::ENAMETOOLONG) => FsError::NameTooLong,
            Some(libc::EACCES) => FsError::Access,
            Some(libc::EPERM) => FsError::NotPermitted,
            Some(libc::ESTALE) => FsError::Stale,
            Some(libc::ENOSPC) => FsError::NoSpace,
            Some(libc::EFBIG) => FsError::TooBig,
            Some(libc::ELOOP) => FsError::Loop,
            Some(libc::EXDEV) => FsError::CrossDevice,
            Some(libc::EINVAL) => FsError::Invalid(e.to_string()),
            _ => FsError::Io(e.to_string()),
        }
    }
}

/// Checks one path component: no `/`, NUL, `.`, `..`, empty or over-long names.
pub fn validate_name(name: &str) -> Result<(), FsError> {
    if name.is_empty() {
        return Err(FsError::InvalidName("empty name".into()));
    }
    if name == "." || name == ".." {
        return Err(FsError::InvalidName(format!("{name:?} is not allowed")));
    }
    if name.contains('/') {
        return Err(FsError::InvalidName(format!("{name:?} contains '/'")));
    }
    if name.contains('\0') {
        return Err(FsError::InvalidName(format!("{name:?} contains NUL")));
    }
    if name.len() > 255 {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused() {
        for bad in ["", ".", "..", "a/b", "/abs", "nul\0x"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(validate_name(&"x".repeat(256)), Err(FsError::NameTooLong));
        for good in ["a", "...", ".hidden", "with space", "ünïcode"] {
            assert!(validate_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn io_errors_map_to_matching_errno() {
        for errno in [libc::ENOENT, libc::EEXIST, libc::ENOTDIR, libc::EISDIR, libc::ENOTEMPTY, libc::EXDEV] {
            let e: FsError = std::io::Error::from_raw_os_error(errno).into();
            assert_eq!(e.errno(), errno);
        }
    }
}
