//! The `lockspace identity` check: when the shared filesystem behind `lockspace_dir` is not
//! mounted, the path still names a directory (the mount point), and locks taken there reach no
//! other host. With `lockspace_id` set, every hook call that locks checks that the directory holds
//! that identity (`crate::lockspace_id`), so such a start is refused; without it, doctor says
//! whether a fleet should set it.

use crate::config::Config;

use super::{Finding, Severity};

/// The lockspace is the initialised one (see `lockspace_id`), so an unmounted share is noticed.
pub(super) fn check(config: &Config, out: &mut Vec<Finding>) {
    const CHECK: &str = "lockspace identity";
    let dir = &config.lockspace_dir;
    match (&config.lockspace_id, crate::lockspace_id::read(dir)) {
        (Some(expected), _) => match crate::lockspace_id::verify(dir, expected) {
            Ok(()) => out.push(Finding::new(Severity::Ok, CHECK, format!("{} is lockspace {expected}", dir.display()))),
            Err(e) => out.push(Finding::new(Severity::Error, CHECK, crate::error_chain(&e))),
        },
        (None, Ok(Some(found))) => out.push(Finding::new(
            Severity::Warn,
            CHECK,
            format!(
                "{} is lockspace {found} but lockspace_id is not set: set lockspace_id = \"{found}\" so a start \
                 is refused when the shared filesystem is not mounted",
                dir.display()
            ),
        )),
        (None, Ok(None)) => out.push(Finding::new(
            Severity::Info,
            CHECK,
            format!(
                "{} has no identity (lockspace_id unset): fine for one host; a fleet should run `lockhook lockspace \
                 init` and set lockspace_id",
                dir.display()
            ),
        )),
        (None, Err(e)) => out.push(Finding::new(Severity::Warn, CHECK, crate::error_chain(&e))),
    }
}
