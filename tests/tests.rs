//! Integration tests: one binary, real `afsd` (and `venus`) processes.
//! Run `cargo build --workspace` first (the README's test command does).

mod support;

mod rpc_semantics;
mod server_callbacks;
mod server_safety;
mod venus_connected;
mod venus_create_on_close;
mod venus_hoard;
mod venus_offline;
mod venus_offline_edges;
mod venus_random;
mod venus_reintegration;
