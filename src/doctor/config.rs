//! The `config` check: the config must load and validate, because the hook refuses every guest
//! start while it does not. A config file that does not exist is fine: lockhook uses the
//! defaults. When it does not load, the remaining checks use what it says where it parses (a
//! config refused for its owner or mode still names its directories), else the defaults.

use crate::config::Config;

use super::{Finding, Layout, Severity};

/// Loads the config; on failure the remaining checks use its values as written, else the
/// defaults.
pub(super) fn check(layout: &Layout, out: &mut Vec<Finding>) -> Config {
    const CHECK: &str = "config";
    let path = &layout.config_path;
    match Config::load(path) {
        Ok(config) => {
            let message = if path.exists() {
                format!("{} is valid", path.display())
            } else {
                format!("{} does not exist: lockhook uses the defaults", path.display())
            };
            out.push(Finding::new(Severity::Ok, CHECK, message));
            config
        }
        Err(e) => {
            let as_written = std::fs::read_to_string(path).ok().and_then(|text| Config::parse(&text).ok());
            let used = if as_written.is_some() { "its values as written" } else { "the defaults" };
            out.push(Finding::new(
                Severity::Error,
                CHECK,
                format!(
                    "{}: the hook refuses every guest start until this is fixed (the checks below use {used})",
                    crate::error_chain(&e)
                ),
            ));
            as_written.unwrap_or_default()
        }
    }
}
