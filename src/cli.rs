//! Command line: the clap tree and what each command does.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config};
use crate::domain::Uuid;
use crate::hook::{self, HookEvent};
use crate::paths::Paths;

#[derive(Debug, Parser)]
#[command(name = "lockhook", version, about = "Locks every disk and lease of a libvirt/QEMU guest for its whole life")]
pub struct Cli {
    /// Config file (default: $LOCKHOOK_CONFIG, else /etc/lockhook/lockhook.toml).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum LockspaceAction {
    /// Give `lockspace_dir` its identity (once per fleet, with the shared storage mounted) and
    /// print the `lockspace_id` line for every host's config; on an initialised lockspace, print
    /// its identity.
    Init,
}

#[derive(Debug, Subcommand)]
pub enum SanlockAction {
    /// Format the lease area ([sanlock] lease_area) once per fleet: lockspace, host table and
    /// resource index. An area that is formatted already is left alone; one holding another
    /// lockspace, or a block device in use, is refused.
    Init,
    /// Join this host to the lockspace under [sanlock] host_id (and libvirt's
    /// __LIBVIRT__DISKS__ with libvirt_disk_lease_dir): a boot-time step that takes about
    /// 2 x io_timeout (lockhook-sanlock-join.service).
    Join,
    /// Show the daemon, the lockspace's hosts and the leases this host's guests hold.
    Status {
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
    },
    /// Internal: the killpath the sanlock daemon runs when this host loses its lockspace lease.
    #[command(name = "lock-lost", hide = true)]
    LockLost { action: String, run_dir: PathBuf, holder_pid: u32 },
}

#[derive(Debug, Subcommand)]
pub enum Generate {
    /// `lockhook.8` and one page per command, into DIR.
    Man { dir: PathBuf },
    /// bash (`lockhook`), zsh (`_lockhook`) and fish (`lockhook.fish`) completions, into DIR.
    Completions { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run as libvirt's qemu hook: `lockhook hook NAME OP SUBOP EXTRA` (domain XML on stdin).
    Hook {
        #[arg(num_args = 0.., allow_hyphen_values = true, trailing_var_arg = true)]
        args: Vec<OsString>,
    },
    /// Show every guest lockhook holds locks for on this host.
    Status {
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
        /// Every host sharing the lockspace: guests and resources from the owner records
        /// (host, guest, UUID, mode, since; records whose holder is gone shown as STALE).
        #[arg(long)]
        fleet: bool,
    },
    /// Say whether images (or lease files) are free, or who holds them. Exit 0 when every path
    /// is free, 1 when any is in use, 2 on error.
    Check {
        /// Check byte OFFSET instead of byte 0 (for lease files).
        #[arg(long, value_name = "OFFSET")]
        offset: Option<u64>,
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Run COMMAND while holding the locks a guest would take on PATHs (exclusive by default);
    /// refuse (exit 75) when any is in use.
    Run {
        /// Take shared locks (for commands that only read, e.g. `qemu-img info`, `qemu-img convert` from it).
        #[arg(long, conflicts_with = "exclusive")]
        shared: bool,
        /// Take exclusive locks (the default).
        #[arg(long)]
        exclusive: bool,
        /// The command writes the backing chain too (`qemu-img commit` writes the image below):
        /// lock every backing image and data file exclusively, not shared.
        #[arg(long, conflicts_with = "shared")]
        write_backing: bool,
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<OsString>,
    },
    /// Re-adopt running guests whose holder is gone and release holders whose guest is gone.
    Reconcile,
    /// Print this host's locks as Prometheus metrics (text exposition format), or write them
    /// atomically to PATH for node_exporter's textfile collector.
    Metrics {
        #[arg(long, value_name = "PATH")]
        textfile: Option<PathBuf>,
    },
    /// Check this host's installation and say what to fix (exit 0 fine, 1 warnings, 2 errors).
    Doctor,
    /// The shared lockspace of a fleet.
    Lockspace {
        #[command(subcommand)]
        action: LockspaceAction,
    },
    /// The sanlock engine (engine = "sanlock"): its lease area and this host's membership.
    Sanlock {
        #[command(subcommand)]
        action: SanlockAction,
    },
    /// Write the man pages or the shell completions (what `install.sh` installs).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
    /// Internal: PID 1 of `lockhook run`'s command (see `supervise`).
    #[command(name = "run-init", hide = true)]
    RunInit {
        #[arg(long)]
        alive_fd: i32,
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
    /// Internal: the per-guest lock holder (started by the hook).
    #[command(hide = true)]
    Holder {
        #[arg(long, required_unless_present = "spare")]
        uuid: Option<String>,
        #[arg(long)]
        ready_fd: Option<i32>,
        /// A spare holder, claimed by the next `prepare`.
        #[arg(long, conflicts_with = "uuid")]
        spare: bool,
    },
}

/// Hook mode: `argv[0]` is `.../qemu`. Prints only to stderr, one line per problem.
#[allow(clippy::result_large_err)]
pub fn run_hook(args: &[OsString], config_flag: Option<PathBuf>) -> ExitCode {
    let result = HookEvent::parse(args).and_then(|event| {
        let config_path = config::path_from(config_flag.as_deref());
        hook::run(&event, &mut std::io::stdin().lock(), &config_path)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            for line in err.lines() {
                eprintln!("lockhook: {}", crate::one_line(&line));
            }
            ExitCode::FAILURE
        }
    }
}

fn load(cli_config: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(&config::path_from(cli_config)).map_err(|e| {
        eprintln!("lockhook: {}", crate::error_chain(&e));
        ExitCode::from(2)
    })
}

fn run_sanlock(action: SanlockAction, config_flag: Option<&std::path::Path>) -> ExitCode {
    use crate::engine::admin;
    if let SanlockAction::LockLost { action, run_dir, holder_pid } = &action {
        // Run by the sanlock daemon: it logs like a holder (syslog), whatever the config says.
        let config = Config::load(&config::path_from(config_flag)).unwrap_or_default();
        crate::logging::init_daemon(&config);
        let action = match action.as_str() {
            "pause" => config::LockLost::Pause,
            _ => config::LockLost::Kill,
        };
        return match crate::engine::lock_lost::run(action, run_dir, *holder_pid, &config.libvirt_run_dir) {
            Ok(done) => {
                eprintln!("lockhook: {done}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                log::error!("sanlock killpath: {}", crate::error_chain(&e));
                eprintln!("lockhook: {}", crate::one_line(&crate::error_chain(&e)));
                ExitCode::from(1)
            }
        };
    }
    let config = match load(config_flag) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let done = match action {
        SanlockAction::Init => admin::init(&config).map(|line| println!("{line}")),
        SanlockAction::Join => admin::join(&config).map(|lines| println!("{lines}")),
        SanlockAction::Status { json } => admin::status(&config).map(|status| {
            let mut out = std::io::stdout().lock();
            if json {
                let _ = serde_json::to_writer_pretty(&mut out, &status);
                let _ = std::io::Write::write_all(&mut out, b"\n");
            } else {
                let _ = status.print(&mut out);
            }
        }),
        SanlockAction::LockLost { .. } => unreachable!("handled above"),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lockhook: {}", crate::one_line(&crate::error_chain(&e)));
            ExitCode::from(2)
        }
    }
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Hook { args } => run_hook(&args, cli.config),
        Command::Status { json, fleet } => {
            let config = match load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            crate::logging::init_cli(config.level());
            let out = &mut std::io::stdout().lock();
            let (printed, dir) = if fleet {
                let lockspace = crate::lockspace::Lockspace::new(&config.lockspace_dir);
                (crate::status::print_fleet(&lockspace, json, out), &config.lockspace_dir)
            } else {
                (crate::status::print(&Paths::new(&config.run_dir), json, out), &config.run_dir)
            };
            match printed {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("lockhook: {}: {e}", dir.display());
                    ExitCode::from(2)
                }
            }
        }
        Command::Check { offset, json, paths } => {
            let config = match load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let results = crate::guard::check(&config, &paths, offset.unwrap_or(0));
            match crate::guard::report(&results, json, &mut std::io::stdout().lock()) {
                Ok(code) => ExitCode::from(code),
                Err(_) => ExitCode::from(2),
            }
        }
        Command::Run { shared, exclusive: _, write_backing, paths, command } => {
            let config = match load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            crate::logging::init_cli(config.level().min(log::LevelFilter::Warn));
            let mode = if shared { crate::lock::LockMode::Shared } else { crate::lock::LockMode::Exclusive };
            match crate::guard::run(&config, mode, write_backing, &paths, &command) {
                Ok(status) => ExitCode::from(crate::guard::exit_code(status)),
                Err(crate::guard::RunError::Refused(refusal)) => {
                    for line in &refusal.lines {
                        eprintln!("lockhook: {}", crate::one_line(line));
                    }
                    ExitCode::from(crate::guard::EXIT_REFUSED)
                }
                Err(e) => {
                    eprintln!("lockhook: {}", crate::one_line(&crate::error_chain(&e)));
                    ExitCode::from(2)
                }
            }
        }
        Command::Doctor => {
            let layout = crate::doctor::Layout::system(&config::path_from(cli.config.as_deref()));
            let findings = crate::doctor::diagnose(&layout);
            let _ = crate::doctor::print(&findings, &mut std::io::stdout().lock());
            ExitCode::from(crate::doctor::exit_code(&findings))
        }
        Command::Lockspace { action: LockspaceAction::Init } => {
            let config = match load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match crate::lockspace_id::init(&config.lockspace_dir) {
                Ok((id, fresh)) => {
                    let what = if fresh { "initialised" } else { "was initialised before" };
                    println!("lockspace {} {what}; its identity:", config.lockspace_dir.display());
                    println!("lockspace_id = \"{id}\"");
                    println!("(put this line in /etc/lockhook/lockhook.toml on every host that shares it)");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lockhook: {}", crate::one_line(&crate::error_chain(&e)));
                    ExitCode::from(2)
                }
            }
        }
        Command::Sanlock { action } => run_sanlock(action, cli.config.as_deref()),
        Command::Generate { what } => {
            let (dir, written) = match &what {
                Generate::Man { dir } => (dir, crate::manual::write_man_pages(dir)),
                Generate::Completions { dir } => (dir, crate::manual::write_completions(dir)),
            };
            match written {
                Ok(files) => {
                    for file in files {
                        println!("{}", file.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lockhook: {}: {e}", dir.display());
                    ExitCode::from(2)
                }
            }
        }
        Command::Metrics { textfile } => {
            let config = match load(cli.config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let text = match crate::metrics::render(&Paths::new(&config.run_dir)) {
                Ok(text) => text,
                Err(e) => {
                    eprintln!("lockhook: {}: {e}", config.run_dir.display());
                    return ExitCode::from(2);
                }
            };
            let written = match &textfile {
                Some(path) => crate::metrics::write_textfile(path, &text).map_err(|e| (path.clone(), e)),
                None => std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())
                    .map_err(|e| (PathBuf::from("stdout"), e)),
            };
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err((path, e)) => {
                    eprintln!("lockhook: {}: {e}", path.display());
                    ExitCode::from(2)
                }
            }
        }
        Command::Reconcile => {
            let config_path = config::path_from(cli.config.as_deref());
            let config = match load(Some(&config_path)) {
                Ok(c) => c,
                Err(code) => return code,
            };
            crate::logging::init_cli(config.level());
            let report = crate::reconcile::reconcile(&config, &config_path);
            let _ = report.print(&mut std::io::stdout().lock());
            if report.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Command::RunInit { alive_fd, command } => {
            ExitCode::from(u8::try_from(crate::supervise::init(alive_fd, &command)).unwrap_or(1))
        }
        Command::Holder { uuid, ready_fd, spare } => {
            let config_path = config::path_from(cli.config.as_deref());
            let code = match (spare, uuid.map(|u| Uuid::parse(&u))) {
                (true, _) => crate::holder::spare::run(&config_path),
                (false, Some(Ok(uuid))) => crate::holder::bootstrap::run(&config_path, &uuid, ready_fd.unwrap_or(-1)),
                _ => 2,
            };
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn clap_tree_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn hook_subcommand_takes_libvirt_args() {
        let cli = Cli::try_parse_from(["lockhook", "hook", "vm1", "prepare", "begin", "-"]).expect("parse");
        match cli.command {
            Command::Hook { args } => assert_eq!(args.len(), 4),
            other => panic!("{other:?}"),
        }
    }
}
