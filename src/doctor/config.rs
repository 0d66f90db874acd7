//! The `config` check: the config must load and validate, because the hook refuses every guest
//! start while it does not. A config file that does not exist is fine: lockhook uses the
//! defaults. When it does not load, the remaining checks use the defaults too.

use crate::config::Config;

use super::{Finding, Layout, Severity};

/// Loads the config; on failure the remaining checks use the defaults.
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
            out.push(Finding::new(
                Severity::Error,
                CHECK,
                format!(
                    "{}: the hook refuses every guest start until this is fixed (the checks below use the defaults)",
                    crate::error_chain(&e)
                ),
            ));
            Config::default()
        }
    }
}
