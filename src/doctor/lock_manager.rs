//! The `lock_manager` check: libvirt's own lock manager, `lock_manager` in
//! `<libvirt_config_dir>/qemu.conf`, must not fight lockhook. `lockd` (virtlockd) locks byte 0 of
//! the images as lockhook does, so every guest would refuse itself: an error. `sanlock` guards the
//! same images a second time: a warning. `nop`, or no setting (libvirt's default), is what
//! lockhook expects.

use std::fs;
use std::io;

use super::{Finding, Layout, Severity};

/// The value of the first uncommented `lock_manager = "..."` in qemu.conf text (libvirt's
/// `virConfGetValue` returns the first entry of a name). Quotes are `"` or `'`; a trailing
/// `# comment` is ignored.
fn parse_lock_manager(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line.trim_start().strip_prefix("lock_manager")?;
        let value = rest.trim_start().strip_prefix('=')?.trim_start();
        let value = match value.chars().next()? {
            quote @ ('"' | '\'') => &value[1..][..value[1..].find(quote)?],
            _ => value.split('#').next()?.trim(),
        };
        Some(value.to_owned())
    })
}

pub(super) fn check(layout: &Layout, out: &mut Vec<Finding>) {
    const CHECK: &str = "lock_manager";
    let path = layout.libvirt_config_dir.join("qemu.conf");
    let shown = path.display();
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            out.push(Finding::new(Severity::Ok, CHECK, format!("{shown} does not exist: no lock manager (nop)")));
            return;
        }
        Err(e) => {
            out.push(Finding::new(
                Severity::Warn,
                CHECK,
                format!("{shown}: cannot read: {e}: lock_manager not checked"),
            ));
            return;
        }
    };
    let finding = match parse_lock_manager(&text).as_deref() {
        None => Finding::new(Severity::Ok, CHECK, format!("{shown} sets no lock_manager (nop)")),
        Some("nop") => Finding::new(Severity::Ok, CHECK, format!("{shown} sets lock_manager = \"nop\"")),
        Some("lockd") => Finding::new(
            Severity::Error,
            CHECK,
            format!(
                "{shown} sets lock_manager = \"lockd\": it locks byte 0 like lockhook, so guests would refuse \
                 themselves; set it to \"nop\" or remove it"
            ),
        ),
        Some("sanlock") => Finding::new(
            Severity::Warn,
            CHECK,
            format!(
                "{shown} sets lock_manager = \"sanlock\": redundant with lockhook (two lock managers guarding the \
                 same images); set it to \"nop\" or remove it unless you rely on sanlock leases"
            ),
        ),
        Some(other) => Finding::new(
            Severity::Warn,
            CHECK,
            format!("{shown} sets lock_manager = {other:?}, which lockhook does not know; \"nop\" is expected"),
        ),
    };
    out.push(finding);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_manager_parsing() {
        assert_eq!(parse_lock_manager(""), None);
        assert_eq!(parse_lock_manager("#lock_manager = \"lockd\"\n"), None);
        assert_eq!(parse_lock_manager("  # lock_manager = \"lockd\"\n"), None);
        assert_eq!(parse_lock_manager("lock_manager = \"lockd\"\n").as_deref(), Some("lockd"));
        assert_eq!(parse_lock_manager("\tlock_manager=\"sanlock\"  # yes\n").as_deref(), Some("sanlock"));
        assert_eq!(parse_lock_manager("lock_manager   =   'nop'\n").as_deref(), Some("nop"));
        assert_eq!(parse_lock_manager("lock_manager = lockd # unquoted\n").as_deref(), Some("lockd"));
        // Other keys that start the same, or mention it, are not it.
        assert_eq!(parse_lock_manager("lock_manager_x = \"lockd\"\nuser = \"lock_manager = lockd\"\n"), None);
        // libvirt uses the first entry of a name.
        assert_eq!(
            parse_lock_manager("# lock_manager = \"sanlock\"\nlock_manager = \"nop\"\nlock_manager = \"lockd\"\n")
                .as_deref(),
            Some("nop")
        );
        // An unterminated string is no value.
        assert_eq!(parse_lock_manager("lock_manager = \"lockd\n"), None);
    }
}
