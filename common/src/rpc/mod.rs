//! RPC over one TCP connection per client: multiplexed requests, server
//! pushes, retransmission with stable transaction ids, at-most-once execution.

mod bulk;
mod client;
mod landing;
mod outbox;
mod server;
mod socket;

pub use bulk::{fetch_to_file, store_from_file, store_request, store_with_seq, FETCH_WINDOW};
pub use client::{Client, ClientConfig, ClientEvent, RpcError};
pub use landing::Sink;
pub use server::{is_acknowledged_already, BreakOutcome, Hooks, Pusher, RpcServer};

/// Runs blocking work (a disk read or write) from async code: on the
/// multi-threaded runtime this worker's other tasks move elsewhere
/// meanwhile; a current-thread runtime (tests, tools) just runs it.
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}
