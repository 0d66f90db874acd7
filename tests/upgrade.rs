//! Issue 14: an upgrade never drops a lock. Guests run under lockhook N on a real libvirtd; the
//! binary is replaced (as `install.sh` and the package do: a new file renamed over the old) by
//! N+1, a build of this source with the protocol version bumped (`LOCKHOOK_PROTOCOL_BUMP=1`) and
//! a version suffix. The old holders keep running and keep every lock; the new hook and tools
//! talk to them in the older protocol; stop and start work; `status` shows each holder's release.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lockhook::lock::LockMode;

use crate::common::libvirtd::{guest_xml, random_uuid, Libvirtd, LibvirtdOptions};
use crate::common::{lock_state, lockhook_bin, wait_until, Setup};

/// Builds lockhook N+1 from this source into its own target directory; returns the binary.
fn build_next() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("target/upgrade-test");
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--locked", "--bin", "lockhook", "--target-dir"])
        .arg(&target)
        .current_dir(root)
        .env("LOCKHOOK_PROTOCOL_BUMP", "1")
        .env("LOCKHOOK_VERSION_SUFFIX", "+next")
        .output()
        .expect("cargo build");
    assert!(out.status.success(), "building N+1: {}", String::from_utf8_lossy(&out.stderr));
    target.join("debug/lockhook")
}

fn install(from: &Path, at: &Path) {
    let tmp = at.with_extension("new");
    std::fs::copy(from, &tmp).expect("copy binary");
    std::fs::rename(&tmp, at).expect("rename over the old binary");
}

fn version_of(bin: &Path) -> String {
    let out = Command::new(bin).arg("--version").output().expect("--version");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn an_upgrade_keeps_every_lock_and_talks_to_old_holders() {
    let next = build_next();
    assert!(version_of(&next).ends_with("+next"), "N+1 is a different build: {}", version_of(&next));
    let setup = Setup::new("");
    let bin = setup.path("sbin/lockhook");
    std::fs::create_dir_all(bin.parent().expect("parent")).expect("mkdir");
    install(&lockhook_bin(), &bin);
    let lv = Libvirtd::start(LibvirtdOptions {
        hook_binary: Some(bin.clone()),
        extra_mounts: vec![(setup.path("etc"), PathBuf::from("/etc/lockhook"))],
        ..LibvirtdOptions::default()
    });
    let (a, b) = (setup.image("images/a.raw"), setup.image("images/b.raw"));
    let disk = |p: &Path| crate::common::xml::raw(p, "vda");
    let define = |name: &str, img: &Path| lv.define(&guest_xml(name, &random_uuid(), &disk(img)));
    define("vm1", &a);
    define("vm2", &a);
    define("vm3", &b);
    lv.virsh_ok(&["start", "vm1"]);
    let status = |bin: &Path| -> serde_json::Value {
        let out =
            Command::new(bin).arg("--config").arg(&setup.config).args(["status", "--json"]).output().expect("status");
        serde_json::from_slice(&out.stdout).expect("status JSON")
    };
    let release_of = |s: &serde_json::Value, name: &str| {
        s["guests"].as_array().and_then(|g| g.iter().find(|g| g["name"] == name)).map(|g| g["holder_version"].clone())
    };
    let n = env!("CARGO_PKG_VERSION");
    assert_eq!(release_of(&status(&bin), "vm1"), Some(serde_json::json!(n)));
    let old_holder = status(&bin)["guests"][0]["holder_pid"].as_u64().expect("pid");

    // The upgrade: a new binary renamed over the old one while vm1 runs.
    install(&next, &bin);
    assert!(version_of(&bin).ends_with("+next"));
    assert_eq!(lock_state(&a, 0), Some(LockMode::Exclusive), "vm1's lock held through the upgrade");
    assert!(Path::new(&format!("/proc/{old_holder}")).exists(), "the old holder runs on");
    // The new tools read the old holder's state and show its release.
    let text = String::from_utf8(
        Command::new(&bin).arg("--config").arg(&setup.config).arg("status").output().expect("status").stdout,
    )
    .expect("utf8");
    assert!(text.contains(&format!("(lockhook {n})")), "{text}");
    // The new hook refuses a second writer of vm1's image, and starts others with new holders.
    let out = lv.virsh(&["start", "vm2"]);
    assert!(!out.status.success(), "vm2 started on vm1's image after the upgrade");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is locked exclusively by guest vm1"));
    lv.virsh_ok(&["start", "vm3"]);
    assert_eq!(release_of(&status(&bin), "vm3"), Some(serde_json::json!(format!("{n}+next"))));
    // libvirtd restarts (as after its own upgrade): the new `reconnect` hook talks to the old
    // holder, in the old protocol, and the guest keeps its holder and lock.
    lv.kill_daemon();
    lv.restart_daemon();
    let talked = || setup.log().contains("holder speaks protocol version 1");
    assert!(wait_until(Duration::from_secs(30), talked), "{}", setup.log());
    assert_eq!(
        status(&bin)["guests"]
            .as_array()
            .and_then(|g| g.iter().find(|g| g["name"] == "vm1"))
            .and_then(|g| g["holder_pid"].as_u64()),
        Some(old_holder)
    );
    assert_eq!(lock_state(&a, 0), Some(LockMode::Exclusive));
    // Stop: the old holder lets go.
    lv.virsh_ok(&["destroy", "vm1"]);
    assert!(wait_until(Duration::from_secs(10), || lock_state(&a, 0).is_none()), "vm1's lock released");
    // Start again: a new holder, of the new release.
    lv.virsh_ok(&["start", "vm1"]);
    assert_eq!(release_of(&status(&bin), "vm1"), Some(serde_json::json!(format!("{n}+next"))));
    assert_eq!(lock_state(&a, 0), Some(LockMode::Exclusive));
    lv.virsh_ok(&["destroy", "vm1"]);
    lv.virsh_ok(&["destroy", "vm3"]);
}
