//! lockhook: a libvirt `qemu` hook that locks every disk image and lease of a guest for its
//! whole life, with a small per-guest holder process keeping the lock fds. See DESIGN.md.

pub mod cli;
pub mod clock;
pub mod config;
pub mod doctor;
pub mod domain;
pub mod guard;
pub mod holder;
pub mod hook;
pub mod lock;
pub mod lockset;
pub mod lockspace;
pub mod lockspace_id;
pub mod logging;
pub mod migration;
pub mod owner;
pub mod paths;
pub mod qemu;
pub mod reconcile;
pub mod resource;
pub mod rundir;
pub mod sanlock;
pub mod state;
pub mod status;
pub mod storage;
pub mod supervise;
#[cfg(test)]
pub(crate) mod test_support;

/// `text` on one line: control characters (a newline in a guest name or a path) are escaped,
/// so a message libvirt shows the user stays one line per problem.
pub fn one_line(text: &str) -> String {
    text.chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect()
}

/// An error and its sources on one line: `outer: inner: innermost`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        let next = inner.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = inner.source();
    }
    text.replace('\n', " ")
}
