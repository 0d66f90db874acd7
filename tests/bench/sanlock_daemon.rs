//! A private sanlock daemon for the sanlock engine's rows of part 2: the tests' fixture
//! (`tests/common/sanlock.rs`: own `SANLOCK_RUN_DIR`, no watchdog, an `LD_PRELOAD` shim for the
//! two rlimits the sandbox cannot raise), and what the bench checks before it starts one. Never
//! the host's daemon; stopped by its pid.

pub use crate::sanlock::SanlockDaemon;

/// Why the sanlock rows cannot run here, or `None`.
pub fn missing() -> Option<String> {
    let absent = |cmd: &str| crate::util::sh(&format!("command -v {cmd}")).is_empty().then(|| cmd.to_owned());
    let lib = crate::util::sh("ldconfig -p | grep -c 'libsanlock_client.so.1 '");
    [absent("sanlock"), absent("cc")]
        .into_iter()
        .flatten()
        .chain((lib.trim() == "0" || lib.trim().is_empty()).then(|| "libsanlock_client.so.1".to_owned()))
        .reduce(|a, b| format!("{a}, {b}"))
        .map(|m| format!("{m} not found (Debian packages sanlock, libsanlock1, gcc)"))
}
