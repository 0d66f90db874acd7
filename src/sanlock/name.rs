//! Lockspace and resource names: at most 48 bytes (`SANLK_NAME_LEN`), no NUL needed.
//!
//! Two ways in. [`Name::new`] takes a name verbatim, for names someone else chose and lockhook
//! must match byte for byte: a libvirt `<lease>`'s `<lockspace>` and `<key>`, libvirt's
//! `__LIBVIRT__DISKS__` and its MD5 disk names, an administrator's lockspace name. [`Name::fit`]
//! turns any lockhook key into a name: a plain key of at most 47 bytes stays as it is, anything
//! else becomes `~sha256.` and the first 128 bits of the key's SHA-256 in hex (40 bytes).
//!
//! Why 47 and not 48: a 48-byte name has no NUL in its field, which sanlock allows, but a few
//! daemon paths compare names with `strcmp` (the resource index's lockspace check in 3.8.5's
//! `rindex.c`), reading past the field; libvirt limits its keys to 47 for the same reason.
//!
//! `fit` is a wire format: every host of a fleet must derive the same name from the same key, in
//! every version of lockhook, or two hosts would lock the same disk under two names. Never change
//! it; add a new prefix instead. A verbatim name never starts with `~`, so it cannot equal a
//! hashed one. Names keep out of `:`, spaces, `\` and control characters, because sanlock's
//! string forms (`LOCKSPACE:NAME:PATH:OFFSET` in `sanlock client`, `inquire` and libvirt's state
//! strings) escape only paths: a colon in a name would make them ambiguous. A hash collision
//! (even odds only after some 2^64 keys) would make two keys share one lease: an extra refusal,
//! never a missed one.

use std::ffi::c_char;
use std::fmt;

use sha2::{Digest, Sha256};

use super::abi::NAME_LEN;

/// Marks a hashed name; a plain name never starts with `~`.
const HASHED_PREFIX: &str = "~sha256.";
/// Bytes of the SHA-256 kept: 16 (128 bits), 32 hex digits.
const HASHED_BYTES: usize = 16;
/// The longest key [`Name::fit`] keeps verbatim (see the module doc).
const PLAIN_MAX: usize = NAME_LEN - 1;

/// A sanlock lockspace or resource name, 1..=48 bytes, no NUL.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name {
    bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a sanlock name cannot be empty")]
    Empty,
    #[error("{name:?}: a sanlock name is at most 48 bytes, this one is {len}")]
    TooLong { name: String, len: usize },
    #[error("{name:?}: a sanlock name cannot contain a NUL byte")]
    Nul { name: String },
}

impl Name {
    /// `name` exactly as given: for names other software chose (libvirt's lockspace, key and
    /// MD5 disk names, an administrator's lockspace). Only the length and NUL are checked.
    pub fn new(name: &str) -> Result<Name, NameError> {
        Name::from_bytes(name.as_bytes())
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Name, NameError> {
        let lossy = || String::from_utf8_lossy(bytes).into_owned();
        if bytes.is_empty() {
            return Err(NameError::Empty);
        }
        if bytes.len() > NAME_LEN {
            return Err(NameError::TooLong { name: lossy(), len: bytes.len() });
        }
        if bytes.contains(&0) {
            return Err(NameError::Nul { name: lossy() });
        }
        Ok(Name { bytes: bytes.to_vec() })
    }

    /// The name lockhook uses for `key` on every host: `key` itself when it is plain and fits,
    /// otherwise its hash (see the module doc; this mapping must never change).
    pub fn fit(key: &str) -> Name {
        if is_plain(key) {
            return Name { bytes: key.as_bytes().to_vec() };
        }
        Name::hashed(key)
    }

    /// The hashed form of `key`, whatever its length: `~sha256.` + 32 hex digits.
    pub fn hashed(key: &str) -> Name {
        let digest = Sha256::digest(key.as_bytes());
        let mut text = String::with_capacity(HASHED_PREFIX.len() + 2 * HASHED_BYTES);
        text.push_str(HASHED_PREFIX);
        for byte in &digest[..HASHED_BYTES] {
            text.push_str(&format!("{byte:02x}"));
        }
        Name { bytes: text.into_bytes() }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether this is a hashed name (made by [`Name::fit`] or [`Name::hashed`]).
    pub fn is_hashed(&self) -> bool {
        self.bytes.starts_with(HASHED_PREFIX.as_bytes())
    }

    /// The fixed-size C field: the name, then NUL padding (none when it is 48 bytes).
    pub(crate) fn to_c(&self) -> [c_char; NAME_LEN] {
        let mut out = [0 as c_char; NAME_LEN];
        for (dst, src) in out.iter_mut().zip(&self.bytes) {
            *dst = c_char::from_ne_bytes([*src]);
        }
        out
    }

    /// A name the daemon filled in: up to the first NUL or all 48 bytes. `None` when empty.
    pub(crate) fn from_c(field: &[c_char; NAME_LEN]) -> Option<Name> {
        let bytes: Vec<u8> = field.iter().map(|c| c.to_ne_bytes()[0]).take_while(|b| *b != 0).collect();
        (!bytes.is_empty()).then_some(Name { bytes })
    }
}

/// A key that can be its own name: at most 47 bytes, printable ASCII without `:`, space or `\`, and not
/// starting with the hashed prefix's `~`.
fn is_plain(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= PLAIN_MAX
        && !key.starts_with('~')
        && key.bytes().all(|b| b.is_ascii_graphic() && b != b':' && b != b'\\')
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.bytes))
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Name({:?})", String::from_utf8_lossy(&self.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_length_and_nul_only() {
        assert_eq!(Name::new("__LIBVIRT__DISKS__").expect("ok").as_bytes(), b"__LIBVIRT__DISKS__");
        assert_eq!(Name::new("a:b c").expect("verbatim keeps colons").to_string(), "a:b c");
        assert_eq!(Name::new(""), Err(NameError::Empty));
        let exact = "x".repeat(48);
        assert_eq!(Name::new(&exact).expect("48 bytes fit").as_bytes().len(), 48);
        assert!(matches!(Name::new(&"x".repeat(49)), Err(NameError::TooLong { len: 49, .. })));
        assert!(matches!(Name::new("a\0b"), Err(NameError::Nul { .. })));
        // 48 bytes means 48 bytes, not 48 characters.
        assert!(matches!(Name::new(&"é".repeat(25)), Err(NameError::TooLong { len: 50, .. })));
    }

    #[test]
    fn fit_keeps_short_plain_keys() {
        assert_eq!(Name::fit("vm-key").as_bytes(), b"vm-key");
        let md5 = "d41d8cd98f00b204e9800998ecf8427e";
        assert_eq!(Name::fit(md5).as_bytes(), md5.as_bytes());
        assert!(!Name::fit(md5).is_hashed());
        assert!(!Name::fit(&"k".repeat(47)).is_hashed());
    }

    #[test]
    fn fit_hashes_long_or_special_keys() {
        for key in ["block:wwn-0x5000c500a1b2c3d4", "a b", "back\\slash", "~sha256.0000", "", &"k".repeat(48), "é"] {
            let name = Name::fit(key);
            assert!(name.is_hashed(), "{key:?} -> {name}");
            assert_eq!(name.as_bytes().len(), 40);
        }
    }

    /// The mapping is a wire format shared by every host: pin it.
    #[test]
    fn hashed_names_are_stable() {
        // sha256("") = e3b0c44298fc1c149afbf4c8996fb924...
        assert_eq!(Name::hashed("").to_string(), "~sha256.e3b0c44298fc1c149afbf4c8996fb924");
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223...
        assert_eq!(Name::fit("file:abc d").as_bytes().len(), 40);
        assert_eq!(Name::hashed("abc").to_string(), "~sha256.ba7816bf8f01cfea414140de5dae2223");
        assert_ne!(Name::fit("file:/a"), Name::fit("file:/b"));
    }

    #[test]
    fn c_field_round_trip() {
        let name = Name::new("lockhook").expect("ok");
        let field = name.to_c();
        assert_eq!(field[8], 0);
        assert_eq!(Name::from_c(&field), Some(name));
        let full = Name::new(&"z".repeat(48)).expect("ok");
        assert_eq!(Name::from_c(&full.to_c()), Some(full));
        assert_eq!(Name::from_c(&[0; NAME_LEN]), None);
    }
}
