//! `install.sh` run inside a private test host (its own /etc/libvirt, /usr/local/sbin,
//! /etc/lockhook, /var/lib/lockhook and /run), against that host's real libvirtd.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use lockhook::lock::LockMode;

use crate::common::libvirtd::{guest_xml, random_uuid, Libvirtd, LibvirtdOptions};
use crate::common::{lock_state, lockhook_bin, wait_until};

struct Bed {
    _dir: tempfile::TempDir,
    lv: Libvirtd,
    image: PathBuf,
}

fn bed() -> Bed {
    let dir = tempfile::Builder::new().prefix("lockhook-install-").tempdir().expect("temp dir");
    let mounts = [
        ("sbin", "/usr/local/sbin"),
        ("share", "/usr/local/share"),
        ("etc-lockhook", "/etc/lockhook"),
        ("var-lib-lockhook", "/var/lib/lockhook"),
    ];
    let mut extra_mounts = Vec::new();
    for (src, target) in mounts {
        std::fs::create_dir_all(dir.path().join(src)).expect("mkdir");
        extra_mounts.push((dir.path().join(src), PathBuf::from(target)));
    }
    let lv = Libvirtd::start(LibvirtdOptions { extra_mounts, ..LibvirtdOptions::default() });
    let image = dir.path().join("shared.raw");
    std::fs::File::create(&image).and_then(|f| f.set_len(1 << 20)).expect("image");
    for name in ["vm1", "vm2"] {
        let disk = format!(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>",
            image.display()
        );
        lv.define(&guest_xml(name, &random_uuid(), &disk));
    }
    Bed { _dir: dir, lv, image }
}

fn install_sh() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("install.sh").display().to_string()
}

fn run(lv: &Libvirtd, args: &[&str]) -> String {
    let script = install_sh();
    let mut argv = vec!["bash", script.as_str()];
    argv.extend_from_slice(args);
    let out: Output = lv.exec_in_ns(&argv);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "install.sh {args:?} failed: {text}");
    text
}

fn refused(lv: &Libvirtd, name: &str) -> String {
    let out = lv.virsh(&["start", name]);
    assert!(!out.status.success(), "{name} should have been refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn install_activates_the_hook_idempotently_and_uninstall_removes_it() {
    let Bed { _dir, lv, image } = bed();
    let bin = lockhook_bin().display().to_string();
    let out = run(&lv, &["--binary", &bin]);
    assert!(out.contains("sent SIGHUP to libvirtd"), "{out}");
    assert!(out.contains("installed /etc/lockhook/lockhook.toml"), "{out}");
    let hook = lv.etc_dir().join("hooks/qemu");
    assert_eq!(std::fs::read_link(&hook).expect("hook symlink"), PathBuf::from("/usr/local/sbin/lockhook"));
    // Man pages render, and each shell's completion file is where that shell looks for it.
    let man8 = "/usr/local/share/man/man8";
    for page in ["lockhook.8", "lockhook-status.8", "lockhook-check.8", "lockhook-run.8", "lockhook-doctor.8"] {
        let out = lv.exec_in_ns(&["man", "-l", &format!("{man8}/{page}")]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("lockhook"), "man -l {page}: {out:?}");
    }
    let complete = lv.exec_in_ns(&[
        "bash",
        "-c",
        "source /usr/local/share/bash-completion/completions/lockhook && complete -p lockhook",
    ]);
    assert!(String::from_utf8_lossy(&complete.stdout).contains("-F _lockhook lockhook"), "bash: {complete:?}");
    for file in ["zsh/site-functions/_lockhook", "fish/vendor_completions.d/lockhook.fish"] {
        let out = lv.exec_in_ns(&["test", "-s", &format!("/usr/local/share/{file}")]);
        assert!(out.status.success(), "{file} installed");
    }

    lv.virsh_ok(&["start", "vm1"]);
    assert_eq!(lock_state(&image, 0), Some(LockMode::Exclusive));
    let err = refused(&lv, "vm2");
    assert!(err.contains(&format!("lockhook: {} is locked exclusively by guest vm1", image.display())), "{err}");

    let doctor = lv.exec_in_ns(&["/usr/local/sbin/lockhook", "doctor"]);
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert_eq!(doctor.status.code(), Some(0), "doctor on a good install: {report}");
    assert!(report.contains("was sent SIGHUP by the installer (install.sh or the package)"), "{report}");
    std::fs::write(
        lv.etc_dir().join("qemu.conf"),
        format!(
            "{}\nlock_manager = \"lockd\"\n",
            std::fs::read_to_string(lv.etc_dir().join("qemu.conf")).expect("qemu.conf")
        ),
    )
    .expect("write qemu.conf");
    let doctor = lv.exec_in_ns(&["/usr/local/sbin/lockhook", "doctor"]);
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert_eq!(doctor.status.code(), Some(2), "doctor on a broken install: {report}");
    assert!(report.contains("ERROR lock_manager"), "{report}");

    let again = run(&lv, &["--binary", &bin]);
    assert!(
        again.contains("already points") && again.contains("kept the existing /etc/lockhook/lockhook.toml"),
        "{again}"
    );
    let status = lv.exec_in_ns(&["/usr/local/sbin/lockhook", "status"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("guest vm1"), "{status:?}");
    // vm3 starts on the spare holder (same argv as an idle spare): uninstall must stop only the
    // idle spare, never a guest's holder.
    let other = image.with_file_name("other.raw");
    std::fs::File::create(&other).and_then(|f| f.set_len(1 << 20)).expect("image");
    lv.define(&guest_xml("vm3", &random_uuid(), &crate::common::xml::raw(&other, "vda")));
    let spare_up = || {
        let out = lv.exec_in_ns(&["pgrep", "-f", "^lockhook holder --config .* --spare$"]);
        out.status.success()
    };
    assert!(wait_until(Duration::from_secs(10), spare_up), "a spare runs before vm3 starts");
    lv.virsh_ok(&["start", "vm3"]);
    assert_eq!(lock_state(&other, 0), Some(LockMode::Exclusive));

    let out = run(&lv, &["--uninstall"]);
    assert!(out.contains("removed /etc/libvirt/hooks/qemu") && out.contains("still hold locks"), "{out}");
    assert_eq!(lock_state(&other, 0), Some(LockMode::Exclusive), "vm3's holder (a claimed spare) survives uninstall");
    assert_eq!(lock_state(&image, 0), Some(LockMode::Exclusive), "vm1's holder survives uninstall");
    lv.virsh_ok(&["destroy", "vm3"]);
    assert!(hook.symlink_metadata().is_err(), "hook removed");
    let left = lv.exec_in_ns(&["find", "/usr/local/share", "-name", "*lockhook*"]);
    assert!(String::from_utf8_lossy(&left.stdout).trim().is_empty(), "man pages and completions removed: {left:?}");
    let bin_path = lockhook_bin().display().to_string();
    let doctor = lv.exec_in_ns(&[bin_path.as_str(), "doctor"]);
    let report = String::from_utf8_lossy(&doctor.stdout);
    assert_eq!(doctor.status.code(), Some(2), "{report}");
    assert!(report.contains("not installed as a qemu hook"), "{report}");
    // Without the hook, the holder still lets go when vm1's QEMU ends.
    lv.virsh_ok(&["destroy", "vm1"]);
    assert!(wait_until(Duration::from_secs(5), || lock_state(&image, 0).is_none()));
    lv.virsh_ok(&["start", "vm2"]);
    assert_eq!(lock_state(&image, 0), None, "uninstalled: nothing locks");
    lv.virsh_ok(&["destroy", "vm2"]);
}

#[test]
#[ignore = "needs root and a private libvirtd: tests/run-all.sh runs it"]
fn install_keeps_an_administrators_hook() {
    let Bed { _dir, lv, image } = bed();
    let hooks = lv.etc_dir().join("hooks");
    std::fs::create_dir_all(&hooks).expect("mkdir hooks");
    let calls = _dir.path().join("admin-hook.calls");
    let admin = format!("#!/bin/sh\necho \"$*\" >> {}\n", calls.display());
    std::fs::write(hooks.join("qemu"), admin).expect("write admin hook");
    let mut perms = std::fs::metadata(hooks.join("qemu")).expect("meta").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(hooks.join("qemu"), perms).expect("chmod");

    let out = run(&lv, &["--binary", &lockhook_bin().display().to_string()]);
    assert!(out.contains("kept the existing /etc/libvirt/hooks/qemu"), "{out}");
    assert!(hooks.join("qemu.d/50-lockhook").symlink_metadata().is_ok());
    lv.virsh_ok(&["start", "vm1"]);
    assert_eq!(lock_state(&image, 0), Some(LockMode::Exclusive), "lockhook ran from qemu.d");
    assert!(std::fs::read_to_string(&calls).expect("admin hook ran").contains("vm1 prepare begin -"));
    let err = refused(&lv, "vm2");
    assert!(err.contains("is locked exclusively by guest vm1"), "{err}");
    lv.virsh_ok(&["destroy", "vm1"]);
    let out = run(&lv, &["--uninstall"]);
    assert!(
        out.contains("removed /etc/libvirt/hooks/qemu.d/50-lockhook")
            && out.contains("removed /usr/local/sbin/lockhook"),
        "{out}"
    );
    assert!(!out.contains("still hold locks"), "{out}");
    assert!(hooks.join("qemu.d/50-lockhook").symlink_metadata().is_err());
    assert!(hooks.join("qemu").exists(), "the administrator's hook stays");
    let again = run(&lv, &["--uninstall"]);
    assert!(!again.contains("removed"), "idempotent: {again}");
}
