//! Man pages and shell completions, generated from the clap tree (`cli::Cli`), so they say what
//! the binary does and never drift from it. `lockhook generate man DIR` writes `lockhook.8` and
//! one `lockhook-<command>.8` per command; `lockhook generate completions DIR` writes the bash,
//! zsh and fish files. `install.sh` runs both; nothing here runs on a hook call.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// Writes `lockhook.8` and a page for every command that is not internal; returns the files.
pub fn write_man_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let top = Cli::command().name("lockhook");
    let mut written = vec![write_page(dir, "lockhook", top.clone())?];
    for sub in top.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("lockhook-{}", sub.get_name());
        let page = sub
            .clone()
            .name(name.clone())
            .bin_name(format!("lockhook {}", sub.get_name()))
            .version(env!("CARGO_PKG_VERSION"));
        written.push(write_page(dir, &name, page)?);
    }
    Ok(written)
}

fn write_page(dir: &Path, name: &str, command: clap::Command) -> io::Result<PathBuf> {
    let mut text = Vec::new();
    clap_mangen::Man::new(command).section("8").render(&mut text)?;
    let path = dir.join(format!("{name}.8"));
    fs::write(&path, text)?;
    Ok(path)
}

/// Where each shell looks for a completion file, relative to the directory given (the names
/// bash-completion, zsh's `fpath` and fish's `vendor_completions.d` expect).
pub const COMPLETIONS: [(Shell, &str); 3] =
    [(Shell::Bash, "lockhook"), (Shell::Zsh, "_lockhook"), (Shell::Fish, "lockhook.fish")];

/// Writes the bash, zsh and fish completions into `dir`; returns the files.
pub fn write_completions(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (shell, file) in COMPLETIONS {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "lockhook", &mut text);
        let path = dir.join(file);
        fs::write(&path, text)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_per_command_and_a_file_per_shell() {
        let dir = tempfile::tempdir().expect("dir");
        let pages = write_man_pages(dir.path()).expect("man");
        let names: Vec<String> =
            pages.iter().map(|p| p.file_name().expect("name").to_string_lossy().into_owned()).collect();
        for want in ["lockhook.8", "lockhook-status.8", "lockhook-check.8", "lockhook-run.8", "lockhook-doctor.8"] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        assert!(!names.iter().any(|n| n.contains("holder") || n.contains("run-init")), "internal commands: {names:?}");
        let top = fs::read_to_string(dir.path().join("lockhook.8")).expect("read");
        assert!(top.starts_with(".ie") || top.contains(".TH lockhook 8"), "{}", &top[..top.len().min(200)]);
        let files = write_completions(dir.path()).expect("completions");
        assert_eq!(files.len(), 3);
        let bash = fs::read_to_string(dir.path().join("lockhook")).expect("bash");
        assert!(bash.contains("complete -F") && bash.contains("lockhook"), "{bash}");
    }
}
