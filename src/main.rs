//! Entry point: libvirt's hook when called as `.../qemu`, the CLI otherwise.
//!
//! `main` is the C one (`no_main`): std's start-up, which every hook call would pay for, reads
//! `/proc/self/maps` and sets up a signal stack for its stack-overflow message (about 20
//! syscalls). What of it matters is done here: fds 0-2 open (else the first file opened would
//! become stdout), `SIGPIPE` ignored (a closed pipe is an error, not a death), stdout flushed
//! at the end.

#![no_main]

use std::ffi::{c_char, c_int};
use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use lockhook::cli::{self, Cli};

#[unsafe(no_mangle)]
pub extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    lockhook::startup::init();
    let code = run();
    let _ = std::io::stdout().flush();
    lockhook::startup::status(code)
}

fn run() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.first() {
        Some(argv0) if lockhook::hook::invoked_as_hook(argv0) => cli::run_hook(&args[1..], None),
        _ => {
            // The release as built (`--version`), suffix included (see `protocol::release`).
            let release: &'static str = Box::leak(lockhook::holder::protocol::release().into_boxed_str());
            let matches = Cli::command().version(release).get_matches();
            match Cli::from_arg_matches(&matches) {
                Ok(parsed) => cli::run(parsed),
                Err(e) => e.exit(),
            }
        }
    }
}
