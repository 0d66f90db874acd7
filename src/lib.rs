//! lockhook: a libvirt `qemu` hook that locks every disk image and lease of a guest for its
//! whole life, with a small per-guest holder process keeping the lock fds. See DESIGN.md.

pub mod census;
pub mod cli;
pub mod clock;
pub mod config;
pub mod counters;
pub mod doctor;
pub mod domain;
pub mod engine;
pub mod guard;
pub mod guest;
pub mod holder;
pub mod hook;
pub mod libvirt;
pub mod lock;
pub mod lockset;
pub mod lockspace;
pub mod lockspace_id;
pub mod logging;
pub mod manual;
pub mod metrics;
pub mod migration;
pub mod owner;
pub mod paths;
pub mod qemu;
pub mod reconcile;
pub mod resource;
pub mod rundir;
pub mod sanlock;
pub mod shares;
pub mod startup;
pub mod state;
pub mod status;
pub mod storage;
pub mod supervise;
pub mod target;
#[cfg(test)]
pub(crate) mod test_support;

/// `text` on one line: control characters (a newline in a guest name or a path) are escaped,
/// so a message libvirt shows the user stays one line per problem.
pub fn one_line(text: &str) -> String {
    text.chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect()
}

/// An error and its sources on one line: `outer: inner: innermost`. Wrappers that add nothing
/// are `#[error(transparent)]`, so no text is said twice.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_chains_say_each_cause_once() {
        let parse = crate::config::Config::parse("x = 1").expect_err("unknown key");
        let err = crate::config::ConfigError::Parse { path: "/etc/lockhook/lockhook.toml".into(), source: parse };
        let text = super::error_chain(&err);
        assert!(text.starts_with("/etc/lockhook/lockhook.toml: line 1, column 1: unknown field `x`"), "{text}");
        assert_eq!(text.matches("unknown field").count(), 1, "{text}");
        let refusal = crate::lockset::Refusal { lines: vec!["/i/a is locked".into()] };
        assert_eq!(super::error_chain(&crate::guard::RunError::Refused(refusal)), "/i/a is locked");
    }
}
