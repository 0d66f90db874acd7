//! `Domain::parse` on arbitrary bytes must never panic and must return quickly (libFuzzer's
//! `-timeout` catches a hang); a parsed domain must then plan without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lockhook::config::Config;
use lockhook::domain::Domain;

fuzz_target!(|data: &[u8]| {
    if let Ok(domain) = Domain::parse(data) {
        let config = Config::default();
        let plan = lockhook::resource::plan(&domain, &config);
        // Every disk and lease ends up either planned or skipped (a backing chain adds more).
        assert!(plan.requests.len() + plan.skipped.len() >= domain.disks.len() + domain.leases.len());
    }
});
