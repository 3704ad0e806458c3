//! Stopping a run from outside (the coordinator no longer wants it, the agent is shutting down).
//!
//! A [`Cancel`] is an eventfd the supervision loop polls next to the program's pidfd, so a
//! cancellation is seen at once, not at the next timeout tick. The run ends with status
//! `killed` and the reason given.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug)]
pub struct Cancel {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    fd: OwnedFd,
    reason: Mutex<Option<String>>,
}

impl Cancel {
    pub fn new() -> std::io::Result<Cancel> {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Cancel {
            inner: Arc::new(Inner {
                fd,
                reason: Mutex::new(None),
            }),
        })
    }

    /// Stop the run (idempotent; the first reason wins).
    pub fn cancel(&self, reason: &str) {
        let mut r = self.inner.reason.lock().expect("cancel reason");
        if r.is_none() {
            *r = Some(reason.to_string());
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our own eventfd.
        unsafe {
            libc::write(
                self.inner.fd.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }

    pub fn is_cancelled(&self) -> bool {
        self.inner.reason.lock().expect("cancel reason").is_some()
    }

    pub fn reason(&self) -> Option<String> {
        self.inner.reason.lock().expect("cancel reason").clone()
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.inner.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let c = Cancel::new().unwrap();
        assert!(!c.is_cancelled());
        c.cancel("job cancelled");
        c.cancel("shutdown");
        assert_eq!(c.reason().as_deref(), Some("job cancelled"));
        assert_eq!(crate::sys::poll(&[c.fd()], 0).unwrap(), vec![libc::POLLIN]);
    }
}
