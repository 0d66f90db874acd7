//! The C ABI of `libsanlock_client.so.1`, mirrored by hand from sanlock 3.8.5's headers
//! (`sanlock.h`, `sanlock_admin.h`, `sanlock_resource.h`, `sanlock_rv.h`): structs, flags and
//! return codes, nothing else. The sizes and offsets are checked by the tests below against the
//! numbers a C compiler gives for the installed headers (`sizeof`/`offsetof`, x86-64 and every
//! other LP64 target: the structs contain only fixed-width integers and char arrays).
//!
//! These structs travel over the daemon's socket byte for byte, so a wrong layout would not
//! crash: it would lock the wrong name. Change nothing here without re-running the layout tests.

use std::ffi::c_char;

/// Longest lockspace or resource name (`SANLK_NAME_LEN`); a NUL terminator is not required.
pub const NAME_LEN: usize = 48;
/// Path buffer in `sanlk_disk`, including the terminating NUL (`SANLK_PATH_LEN`).
pub const PATH_LEN: usize = 1024;
/// Most resources one acquire or release may name (`SANLK_MAX_RESOURCES`).
pub const MAX_RESOURCES: usize = 8;
/// Killpath program and arguments buffers, including the NUL (`SANLK_HELPER_*_LEN`).
pub const HELPER_PATH_LEN: usize = 128;
pub const HELPER_ARGS_LEN: usize = 128;

// sanlk_resource.flags (SANLK_RES_*); the ALIGN/SECTOR values are shared with SANLK_LSF_* and
// SANLK_RIF_* ("make these values match ... in case of typos").
pub const RES_LVER: u32 = 0x1;
pub const RES_SHARED: u32 = 0x4;
pub const RES_PERSISTENT: u32 = 0x8;
pub const ALIGN1M: u32 = 0x10;
pub const ALIGN2M: u32 = 0x20;
pub const ALIGN4M: u32 = 0x40;
pub const ALIGN8M: u32 = 0x80;
pub const SECTOR512: u32 = 0x100;
pub const SECTOR4K: u32 = 0x200;

// sanlock_acquire flags (SANLK_ACQUIRE_*).
pub const ACQUIRE_ORPHAN: u32 = 0x2;
pub const ACQUIRE_ORPHAN_ONLY: u32 = 0x4;
pub const ACQUIRE_OWNER_NOWAIT: u32 = 0x8;

// sanlock_release flags (SANLK_REL_*).
pub const REL_ALL: u32 = 0x1;
// sanlock_killpath flags: append the client's pid to the arguments.
pub const KILLPATH_PID: u32 = 0x1;

// sanlock_rem_lockspace flags (SANLK_REM_*).
pub const REM_UNUSED: u32 = 0x2;

// sanlk_host.flags & SANLK_HOST_MASK, as returned by sanlock_get_hosts.
pub const HOST_UNKNOWN: u32 = 0x1;
pub const HOST_FREE: u32 = 0x2;
pub const HOST_LIVE: u32 = 0x3;
pub const HOST_FAIL: u32 = 0x4;
pub const HOST_DEAD: u32 = 0x5;
pub const HOST_MASK: u32 = 0xf;

// Return codes of sanlock_rv.h that callers branch on (defined negative, like the -errno values
// the library returns for everything else).
pub const SANLK_ACQUIRE_LVER: i32 = -240;
pub const SANLK_ACQUIRE_IDLIVE: i32 = -243;
pub const SANLK_ACQUIRE_OWNED: i32 = -244;
pub const SANLK_ACQUIRE_OTHER: i32 = -245;
pub const SANLK_ACQUIRE_SHRETRY: i32 = -246;
pub const SANLK_ACQUIRE_OWNED_RETRY: i32 = -247;

/// `struct sanlk_disk`: one area of shared storage. `path` is raw (no `\:` escapes: those exist
/// only in sanlock's string forms) and NUL-terminated.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Disk {
    pub path: [c_char; PATH_LEN],
    pub offset: u64,
    pub pad1: u32,
    pub pad2: u32,
}

/// `struct sanlk_resource` with its flexible `disks[]` member: the header part only. The library
/// reads `num_disks` disks right after it, so it is only ever passed as part of [`Resource1`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ResourceHead {
    pub lockspace_name: [c_char; NAME_LEN],
    pub name: [c_char; NAME_LEN],
    pub lver: u64,
    pub data64: u64,
    pub data32: u32,
    pub unused: u32,
    pub flags: u32,
    pub num_disks: u32,
}

/// A `struct sanlk_resource` followed by exactly one `struct sanlk_disk`, laid out as C lays out
/// `disks[0]` (the head is 128 bytes, a multiple of the disk's 8-byte alignment, so no padding
/// sits between them). Every lease lockhook uses lives on one disk, as libvirt's do.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Resource1 {
    pub head: ResourceHead,
    pub disk: Disk,
}

/// `struct sanlk_lockspace`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Lockspace {
    pub name: [c_char; NAME_LEN],
    pub host_id: u64,
    pub flags: u32,
    pub host_id_disk: Disk,
}

/// `struct sanlk_host`: a host's delta lease as the daemon sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Host {
    pub host_id: u64,
    pub generation: u64,
    pub timestamp: u64,
    pub io_timeout: u32,
    pub flags: u32,
}

/// `struct sanlk_rindex`: where a resource index lives and which lockspace it serves.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Rindex {
    pub flags: u32,
    pub max_resources: u32,
    pub unused: u64,
    pub lockspace_name: [c_char; NAME_LEN],
    pub disk: Disk,
}

/// `struct sanlk_rentry`: one name → offset entry of a resource index.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Rentry {
    pub name: [c_char; NAME_LEN],
    pub offset: u64,
    pub flags: u32,
    pub unused: u32,
}

/// `struct sanlk_options` without its (unused, ignored) trailing `str[]`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Options {
    pub owner_name: [c_char; NAME_LEN],
    pub flags: u32,
    pub len: u32,
}

/// An all-zero value of a plain C struct above (every field is an integer or a char array, for
/// which all-zero bytes are valid; this is what the C callers get from `memset(.., 0, ..)`).
pub trait Zeroed: Sized + Copy {
    fn zeroed() -> Self {
        // SAFETY: only implemented below for `#[repr(C)]` structs made of integers and integer
        // arrays, for which the all-zero bit pattern is a valid value.
        unsafe { std::mem::zeroed() }
    }
}

impl Zeroed for Disk {}
impl Zeroed for ResourceHead {}
impl Zeroed for Resource1 {}
impl Zeroed for Lockspace {}
impl Zeroed for Host {}
impl Zeroed for Rindex {}
impl Zeroed for Rentry {}
impl Zeroed for Options {}

#[cfg(test)]
mod tests {
    use std::mem::{align_of, offset_of, size_of};

    use super::*;

    /// The numbers are what gcc prints for sanlock 3.8.5's headers on x86-64 Debian 12
    /// (`printf("%zu", sizeof(struct sanlk_disk))` and so on).
    #[test]
    fn layouts_match_the_c_headers() {
        assert_eq!((size_of::<Disk>(), align_of::<Disk>()), (1040, 8));
        assert_eq!(offset_of!(Disk, offset), 1024);

        assert_eq!((size_of::<ResourceHead>(), align_of::<ResourceHead>()), (128, 8));
        assert_eq!(offset_of!(ResourceHead, name), 48);
        assert_eq!(offset_of!(ResourceHead, lver), 96);
        assert_eq!(offset_of!(ResourceHead, flags), 120);
        assert_eq!(offset_of!(ResourceHead, num_disks), 124);
        // disks[] starts at offsetof(struct sanlk_resource, disks) = 128.
        assert_eq!(offset_of!(Resource1, disk), 128);
        assert_eq!(size_of::<Resource1>(), 128 + 1040);

        assert_eq!((size_of::<Lockspace>(), align_of::<Lockspace>()), (1104, 8));
        assert_eq!(offset_of!(Lockspace, host_id), 48);
        assert_eq!(offset_of!(Lockspace, flags), 56);
        assert_eq!(offset_of!(Lockspace, host_id_disk), 64);

        assert_eq!((size_of::<Host>(), align_of::<Host>()), (32, 8));

        assert_eq!((size_of::<Rindex>(), align_of::<Rindex>()), (1104, 8));
        assert_eq!(offset_of!(Rindex, lockspace_name), 16);
        assert_eq!(offset_of!(Rindex, disk), 64);

        assert_eq!((size_of::<Rentry>(), align_of::<Rentry>()), (64, 8));
        assert_eq!(offset_of!(Rentry, offset), 48);

        assert_eq!((size_of::<Options>(), align_of::<Options>()), (56, 4));
    }

    #[test]
    fn zeroed_is_all_zero() {
        let r = Resource1::zeroed();
        assert_eq!(r.head.num_disks, 0);
        assert!(r.disk.path.iter().all(|c| *c == 0));
    }
}
