//! The `mesher` command: parses the command line, sets up logging and the allocator, and runs
//! the server (`mesher serve`).

use clap::Parser;
use mesher::config::{Cli, Command};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t`; the bindings name no constant for
/// it (a test below checks the number against the option's documented default).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays with the process before it goes back to the kernel. Ingest
/// frees each event on the storage thread after its commit while the reactor goes on taking
/// pages, so with mimalloc's default (1 s) pages were returned and faulted back in all the
/// time (a fault per ~40 events, each zeroing a page). Ten seconds keeps that working set in
/// place and still returns what a burst left behind. `MIMALLOC_PURGE_DELAY` overrides it.
const ALLOCATOR_PURGE_DELAY_MS: std::ffi::c_long = 10_000;

fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options, by its number in the linked mimalloc.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS) };
    }
}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal; log files and collectors get plain lines.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let Command::Serve(config) = cli.command;
    if let Err(error) = mesher::server::run(config) {
        eprintln!("mesher: {error}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        // SAFETY: reads and sets mimalloc options.
        unsafe {
            if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
                // mimalloc v3's documented default for purge_delay: a shifted option number
                // would read another option's value here.
                assert_eq!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), 1000);
            }
            tune_allocator();
            if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
                let delay = libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY);
                assert_eq!(delay, ALLOCATOR_PURGE_DELAY_MS);
            }
        }
    }
}
