//! Entry point: libvirt's hook when called as `.../qemu`, the CLI otherwise.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use lockhook::cli::{self, Cli};

fn main() -> ExitCode {
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
