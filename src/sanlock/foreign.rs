//! The only place that reads or frees memory `libsanlock_client` allocated: the host arrays of
//! `sanlock_get_hosts` and `sanlock_read_resource_owners`, the state string of
//! `sanlock_inquire` and the resource structs `sanlock_state_to_args` makes of it.
//!
//! Such memory comes from the `malloc` of the libc the library runs on, which in lockhook's
//! static build is a private copy with its own heap (see `library.rs`), so it goes back through
//! the `free` looked up in the library's namespace, never Rust's allocator or our own `free`.

use std::ffi::c_void;
use std::ptr::NonNull;

use super::library::Api;

/// `len` values of `T` the library allocated as one block with `malloc`.
pub(crate) struct ForeignArray<T> {
    ptr: Option<NonNull<T>>,
    len: usize,
    free: unsafe extern "C" fn(*mut c_void),
}

impl<T> ForeignArray<T> {
    /// Takes ownership of what an out-parameter pair `(T **, int *)` received.
    ///
    /// # Safety
    /// `ptr` is null or points to `len` initialised values of `T` in one block from the
    /// library's `malloc`, which nobody else frees.
    pub unsafe fn from_raw(api: &Api, ptr: *mut T, len: i32) -> ForeignArray<T> {
        let len = usize::try_from(len).unwrap_or(0);
        ForeignArray { ptr: NonNull::new(ptr), len, free: api.free }
    }

    /// Whether the library reported values but handed out no block: its `malloc` failed (the
    /// get_hosts and read_resource_owners paths then return success with a count and no array).
    pub fn lost(&self) -> bool {
        self.ptr.is_none() && self.len > 0
    }

    pub fn as_slice(&self) -> &[T] {
        match self.ptr {
            // SAFETY: `from_raw`'s contract: `len` initialised values, alive until drop.
            Some(ptr) => unsafe { std::slice::from_raw_parts(ptr.as_ptr(), self.len) },
            None => &[],
        }
    }
}

impl<T> Drop for ForeignArray<T> {
    fn drop(&mut self) {
        if let Some(ptr) = self.ptr {
            // SAFETY: the block came from the library's malloc (`from_raw`) and is freed once,
            // with that same libc's free. `T` needs no drop (plain C data or raw pointers, whose
            // targets are owned separately).
            unsafe { (self.free)(ptr.as_ptr().cast()) }
        }
    }
}

/// One block the library allocated with `malloc` (a C string, one struct).
pub(crate) struct ForeignBox<T> {
    ptr: NonNull<T>,
    free: unsafe extern "C" fn(*mut c_void),
}

impl<T> ForeignBox<T> {
    /// `None` for a null pointer.
    ///
    /// # Safety
    /// `ptr` is null or a block from the library's `malloc` holding an initialised `T` (for a
    /// struct with a flexible array member: its head), which nobody else frees.
    pub unsafe fn from_raw(api: &Api, ptr: *mut T) -> Option<ForeignBox<T>> {
        NonNull::new(ptr).map(|ptr| ForeignBox { ptr, free: api.free })
    }

    pub fn as_ptr(&self) -> *mut T {
        self.ptr.as_ptr()
    }

    pub fn get(&self) -> &T {
        // SAFETY: initialised and alive until drop (`from_raw`'s contract).
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> Drop for ForeignBox<T> {
    fn drop(&mut self) {
        // SAFETY: from the library's malloc, freed once with its own free.
        unsafe { (self.free)(self.ptr.as_ptr().cast()) }
    }
}
