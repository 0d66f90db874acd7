//! One simulated host for end-to-end tests: lockhook's config and run dir, and a private
//! libvirtd that runs lockhook as its `qemu` hook.

use std::path::PathBuf;

use super::libvirtd::{guest_xml, random_uuid, Libvirtd, LibvirtdOptions};
use super::{lockhook_bin, Setup};

/// One simulated host: lockhook's config and run dir, and a libvirtd that calls lockhook.
pub struct Host {
    pub setup: Setup,
    pub lv: Libvirtd,
}

impl Host {
    pub fn new() -> Host {
        Host::with_config("")
    }

    /// A host whose lockhook config has `extra` lines.
    pub fn with_config(extra: &str) -> Host {
        let setup = Setup::new(extra);
        let lv = Libvirtd::start(LibvirtdOptions {
            hook_binary: Some(lockhook_bin()),
            extra_mounts: vec![(setup.path("etc"), PathBuf::from("/etc/lockhook"))],
            ..LibvirtdOptions::default()
        });
        Host { setup, lv }
    }

    /// Defines guest `name` with `devices` XML; returns its UUID.
    pub fn define(&self, name: &str, devices: &str) -> String {
        let uuid = random_uuid();
        self.lv.define(&guest_xml(name, &uuid, devices));
        uuid
    }

    pub fn start(&self, name: &str) {
        self.lv.virsh_ok(&["start", name]);
    }

    /// Starts `name` expecting lockhook to refuse it; returns virsh's stderr.
    pub fn refused(&self, name: &str) -> String {
        let out = self.lv.virsh(&["start", name]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{name} started but should have been refused");
        assert!(err.contains("Hook script execution failed"), "not refused by the hook: {err}");
        assert_eq!(self.lv.virsh_ok(&["domstate", name]).trim(), "shut off");
        err
    }

    pub fn destroy(&self, name: &str) {
        self.lv.virsh_ok(&["destroy", name]);
    }

    pub fn status(&self) -> serde_json::Value {
        self.setup.status_json()
    }

    pub fn guest_names(&self) -> Vec<String> {
        let status = self.status();
        status["guests"]
            .as_array()
            .expect("guests")
            .iter()
            .map(|g| g["name"].as_str().expect("name").to_owned())
            .collect()
    }
}
