//! Entry point: libvirt's hook when called as `.../qemu`, the CLI otherwise.

use std::process::ExitCode;

use clap::Parser;
use lockhook::cli::{self, Cli};

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.first() {
        Some(argv0) if lockhook::hook::invoked_as_hook(argv0) => cli::run_hook(&args[1..], None),
        _ => cli::run(Cli::parse()),
    }
}
