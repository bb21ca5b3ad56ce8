//! The host's user database, read thread-safely (`getpwnam_r`).

use std::ffi::CString;

/// `(uid, gid)` of `name`, if the user exists.
pub fn lookup(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    // SAFETY: getpwnam_r writes into the buffers we own and sizes; `result` is checked
    // before the struct is read.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc =
            libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
    }
}
