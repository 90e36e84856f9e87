//! afsd: the file server. Serves one exported directory as a volume, keeps
//! callback promises, and executes every mutation at most once.

mod callbacks;
mod db;
mod export;
mod handles;
mod inotify;
mod ops;
mod readahead;
mod restart;
mod server;
mod settle;
mod stats;
mod volume;
mod watch;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "afsd", version, about = "AFS/Coda-style file server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a directory as a volume (foreground, until SIGTERM/SIGINT).
    Serve {
        /// The directory to export.
        #[arg(long)]
        export: PathBuf,
        /// Where the server keeps its database and key (created if missing).
        #[arg(long)]
        state: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7000")]
        listen: String,
    },
    /// Print the counters of the server running on a state directory.
    Stats {
        #[arg(long)]
        state: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    common::tune_allocator();
    common::raise_fd_limit();
    common::init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        // Two at least: a commit's flush blocks the worker it runs on (see
        // `Db::sync`), and the other must go on serving.
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().max(2)))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("afsd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Serve { export, state, listen } => server::run(server::Options { export, state, listen }).await,
            Cmd::Stats { state, json } => print_stats(&state, json).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("afsd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn print_stats(state: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let v = stats::query(state).await.map_err(anyhow::Error::msg)?;
    if json {
        println!("{v}");
        return Ok(());
    }
    for key in ["clients", "callbacks", "breaks_sent", "volume_stamp", "objects"] {
        println!("{key:>14}: {}", v[key]);
    }
    println!("{:>14}:", "rpcs");
    if let Some(rpcs) = v["rpcs"].as_object() {
        for (k, n) in rpcs.iter().filter(|(_, n)| n.as_u64() != Some(0)) {
            println!("{k:>16}: {n}");
        }
    }
    Ok(())
}
