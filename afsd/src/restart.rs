//! Restarting afsd in place when its database has stopped (see
//! `common::sled_watchdog`). The process execs itself with the same
//! arguments and hands its listening socket to the new image, so clients
//! find the server at the same address, reconnect, and resend what was in
//! flight under the same transaction ids: recovery at startup redoes what
//! the database committed, and the reply cache answers what already ran.

use anyhow::{bail, Context};
use std::ffi::CString;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

/// The listening socket's descriptor, across the exec.
const LISTEN_FD_VAR: &str = "AFSD_LISTEN_FD";
/// How many times this server restarted itself.
const RESTARTS_VAR: &str = "AFSD_RESTARTS";

/// A probe write stuck this long means sled will not come back.
pub const STUCK_LIMIT: Duration = Duration::from_secs(5);

/// Restarts so far (0 in a process started by hand).
pub fn restarts() -> u32 {
    std::env::var(RESTARTS_VAR).ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The listening socket handed over by the previous image, if any.
pub fn inherited_listener() -> anyhow::Result<Option<std::net::TcpListener>> {
    let Some(v) = std::env::var_os(LISTEN_FD_VAR) else { return Ok(None) };
    let fd: RawFd = v.to_str().and_then(|s| s.parse().ok()).with_context(|| format!("{LISTEN_FD_VAR}={v:?}"))?;
    // SAFETY: fstat and fcntl only inspect the descriptor.
    let is_socket = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
    };
    if !is_socket {
        bail!("{LISTEN_FD_VAR}={fd} is not a socket");
    }
    // SAFETY: the descriptor is a socket this process owns from the exec on;
    // nothing else refers to it. Close-on-exec again, like any socket of ours.
    let listener = unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        std::net::TcpListener::from_raw_fd(fd)
    };
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

/// Replaces this process with a fresh afsd, handing over `listen_fd` (when
/// there is one yet). Does not return; if the exec itself fails, aborts:
/// a server whose database is stuck must not go on answering pings.
pub fn exec_self(listen_fd: Option<RawFd>) -> ! {
    let to_c = |s: &std::ffi::OsStr| CString::new(s.as_bytes()).ok();
    let args: Vec<CString> = std::env::args_os().filter_map(|a| to_c(&a)).collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != LISTEN_FD_VAR && k != RESTARTS_VAR)
        .filter_map(|(mut kv, v)| {
            kv.push("=");
            kv.push(v);
            to_c(&kv)
        })
        .collect();
    env.push(CString::new(format!("{RESTARTS_VAR}={}", restarts() + 1)).expect("no NUL"));
    if let Some(fd) = listen_fd {
        // SAFETY: clears close-on-exec on a descriptor this process owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        env.push(CString::new(format!("{LISTEN_FD_VAR}={fd}")).expect("no NUL"));
    }
    let ptrs =
        |v: &[CString]| v.iter().map(|c| c.as_ptr()).chain(std::iter::once(std::ptr::null())).collect::<Vec<_>>();
    let (argv, envp) = (ptrs(&args), ptrs(&env));
    let exe = CString::new("/proc/self/exe").expect("no NUL");
    // SAFETY: argv and envp are NULL-terminated arrays of C strings that
    // outlive the call; execve only returns on failure.
    unsafe { libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    tracing::error!("restarting afsd failed: {}", std::io::Error::last_os_error());
    std::process::abort();
}
