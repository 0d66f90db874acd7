//! The only `dlopen`/`dlsym` site: `libsanlock_client.so.1`, loaded once per process on first
//! use and never unloaded, so the function pointers below live as long as the process.
//!
//! Loading at run time instead of linking keeps the library out of every process that does not
//! use the sanlock engine: the OFD-only hook neither needs the library installed nor pays for
//! resolving it. In lockhook's static glibc build (install.sh), `dlopen` still works: glibc's
//! static `dlopen` loads the library together with a second, private copy of `libc.so.6`, which
//! must be the very glibc release the binary was linked with ("Using 'dlopen' in statically
//! linked applications requires at runtime the shared libraries from the glibc version used for
//! linking"). The version check below turns a mismatch (glibc upgraded since the build) into an
//! error instead of undefined behaviour. Two consequences of that private libc, both handled:
//! - memory the library allocates (host lists, inquire's state) belongs to the private libc's
//!   heap and must go back to *its* `free`, which is why `free` is looked up through the
//!   library's handle rather than called directly (see `foreign.rs`);
//! - the library reads `SANLOCK_RUN_DIR` (the daemon's socket directory) from the environment as
//!   the private libc saw it at load time, and caches it on its first connection: set it before
//!   the first sanlock call, never change it after (a process talks to one daemon).
//!
//! In a dynamically linked build there is one libc and both points hold trivially.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use super::abi;
use super::error::LoadError;

/// The soname Debian (and every other distribution) ships in `libsanlock1`: the client half of
/// sanlock, which needs only libc (`libsanlock.so.1` adds the direct-access functions and pulls
/// in libaio, libblkid and libuuid).
pub const LIBRARY: &str = "libsanlock_client.so.1";
const SONAME: &CStr = c"libsanlock_client.so.1";

/// The functions lockhook calls, typed as in `sanlock_resource.h` and `sanlock_admin.h`.
/// Arguments the headers declare `char *` or `struct *` without `const` are not written by the
/// library unless documented (acquire and release only read `res_args`).
pub(crate) struct Api {
    pub register: unsafe extern "C" fn() -> c_int,
    pub killpath: unsafe extern "C" fn(c_int, u32, *const c_char, *mut c_char) -> c_int,
    pub acquire:
        unsafe extern "C" fn(c_int, c_int, u32, c_int, *mut *mut abi::ResourceHead, *mut abi::Options) -> c_int,
    pub release: unsafe extern "C" fn(c_int, c_int, u32, c_int, *mut *mut abi::ResourceHead) -> c_int,
    pub inquire: unsafe extern "C" fn(c_int, c_int, u32, *mut c_int, *mut *mut c_char) -> c_int,
    pub state_to_args: unsafe extern "C" fn(*mut c_char, *mut c_int, *mut *mut *mut abi::ResourceHead) -> c_int,
    pub version: unsafe extern "C" fn(u32, *mut u32, *mut u32) -> c_int,
    pub write_lockspace: unsafe extern "C" fn(*mut abi::Lockspace, c_int, u32, u32) -> c_int,
    pub read_lockspace: unsafe extern "C" fn(*mut abi::Lockspace, u32, *mut u32) -> c_int,
    pub add_lockspace_timeout: unsafe extern "C" fn(*mut abi::Lockspace, u32, u32) -> c_int,
    pub inq_lockspace: unsafe extern "C" fn(*mut abi::Lockspace, u32) -> c_int,
    pub rem_lockspace: unsafe extern "C" fn(*mut abi::Lockspace, u32) -> c_int,
    pub get_hosts: unsafe extern "C" fn(*const c_char, u64, *mut *mut abi::Host, *mut c_int, u32) -> c_int,
    pub write_resource: unsafe extern "C" fn(*mut abi::ResourceHead, c_int, c_int, u32) -> c_int,
    pub read_resource_owners:
        unsafe extern "C" fn(*mut abi::ResourceHead, u32, *mut *mut abi::Host, *mut c_int) -> c_int,
    pub format_rindex: unsafe extern "C" fn(*mut abi::Rindex, u32) -> c_int,
    pub lookup_rindex: unsafe extern "C" fn(*mut abi::Rindex, u32, *mut abi::Rentry) -> c_int,
    pub create_resource: unsafe extern "C" fn(*mut abi::Rindex, u32, *mut abi::Rentry, c_int, c_int) -> c_int,
    pub delete_resource: unsafe extern "C" fn(*mut abi::Rindex, u32, *mut abi::Rentry) -> c_int,
    /// The `free` of the libc the library allocates from.
    pub free: unsafe extern "C" fn(*mut c_void),
}

/// The loaded library, or why it could not be loaded (remembered: `dlopen` is tried once).
pub(crate) fn api() -> Result<&'static Api, LoadError> {
    static API: OnceLock<Result<Api, LoadError>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Api, LoadError> {
    // SAFETY: `SONAME` is a NUL-terminated string; RTLD_NOW resolves every symbol now, so a
    // broken library fails here and not in the middle of a call. The library has no constructors
    // beyond libc's.
    let handle = unsafe { libc::dlopen(SONAME.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(LoadError::Open { library: LIBRARY, reason: dlerror() });
    }
    check_libc(handle)?;
    // SAFETY: for every `symbol` call below, each name is a function of the sanlock 3.8 client
    // API whose C prototype is the field's type (see the headers cited on `Api`), and `handle`
    // stays loaded for the rest of the process.
    unsafe {
        Ok(Api {
            register: symbol(handle, c"sanlock_register")?,
            killpath: symbol(handle, c"sanlock_killpath")?,
            acquire: symbol(handle, c"sanlock_acquire")?,
            release: symbol(handle, c"sanlock_release")?,
            inquire: symbol(handle, c"sanlock_inquire")?,
            state_to_args: symbol(handle, c"sanlock_state_to_args")?,
            version: symbol(handle, c"sanlock_version")?,
            write_lockspace: symbol(handle, c"sanlock_write_lockspace")?,
            read_lockspace: symbol(handle, c"sanlock_read_lockspace")?,
            add_lockspace_timeout: symbol(handle, c"sanlock_add_lockspace_timeout")?,
            inq_lockspace: symbol(handle, c"sanlock_inq_lockspace")?,
            rem_lockspace: symbol(handle, c"sanlock_rem_lockspace")?,
            get_hosts: symbol(handle, c"sanlock_get_hosts")?,
            write_resource: symbol(handle, c"sanlock_write_resource")?,
            read_resource_owners: symbol(handle, c"sanlock_read_resource_owners")?,
            format_rindex: symbol(handle, c"sanlock_format_rindex")?,
            lookup_rindex: symbol(handle, c"sanlock_lookup_rindex")?,
            create_resource: symbol(handle, c"sanlock_create_resource")?,
            delete_resource: symbol(handle, c"sanlock_delete_resource")?,
            free: symbol(handle, c"free")?,
        })
    }
}

/// Resolves `name` in `handle` (or its dependencies: `free` comes from the library's libc).
///
/// # Safety
/// `F` must be the `unsafe extern "C" fn` type matching the C prototype of `name`, and `handle`
/// must never be closed.
unsafe fn symbol<F: Copy>(handle: *mut c_void, name: &'static CStr) -> Result<F, LoadError> {
    const { assert!(size_of::<F>() == size_of::<*mut c_void>()) };
    // SAFETY: `handle` came from a successful dlopen and `name` is NUL-terminated.
    let ptr = unsafe { libc::dlsym(handle, name.as_ptr()) };
    if ptr.is_null() {
        let symbol = name.to_str().unwrap_or("?");
        return Err(LoadError::MissingSymbol { library: LIBRARY, symbol });
    }
    // SAFETY: `ptr` is the address of the function `name`, whose type the caller vouches is `F`
    // (a function pointer, the same size as a data pointer on every Linux target).
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&ptr) })
}

/// Refuses a libc in the library's namespace other than the one this binary was built against
/// (only possible in a static build: a dynamic one has a single libc).
fn check_libc(handle: *mut c_void) -> Result<(), LoadError> {
    // SAFETY: `gnu_get_libc_version` has the prototype `const char *(void)`; the handle is never
    // closed.
    let loaded_fn: unsafe extern "C" fn() -> *const c_char = unsafe { symbol(handle, c"gnu_get_libc_version")? };
    // SAFETY: both return a pointer to a static NUL-terminated version string.
    let (linked, loaded) = unsafe { (CStr::from_ptr(libc::gnu_get_libc_version()), CStr::from_ptr(loaded_fn())) };
    if linked == loaded {
        return Ok(());
    }
    Err(LoadError::LibcMismatch {
        library: LIBRARY,
        linked: linked.to_string_lossy().into_owned(),
        loaded: loaded.to_string_lossy().into_owned(),
    })
}

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated message valid until the next dl* call on
    // this thread; it is copied out at once.
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        return "unknown dlopen error".to_owned();
    }
    // SAFETY: non-null, NUL-terminated (see above).
    unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned()
}
