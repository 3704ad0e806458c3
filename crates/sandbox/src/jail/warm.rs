//! Jails built ahead of the runs that use them.
//!
//! Starting a jail costs a few milliseconds of namespaces, mounts and filters, and starting
//! Python ten more. A long-lived caller (an agent, the coordinator) runs many programs with the
//! same limits, so a thread of the pool builds the next jail while the current one runs: the
//! whole jail, exactly as a cold run gets it, with the interpreter started inside it and waiting
//! on stdin (see `boot.py`). A run that finds a jail with its limits writes its code and input
//! where that jail sees them and sends the environment; the clock starts then.
//!
//! Each jail serves one run and is then torn down like any other: nothing of one program can
//! reach the next. Jails idle for [`IDLE_MAX`] are torn down, and the pool never holds more than
//! its capacity.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fleetbox_proto::AppliedLimits;

use super::{BuildError, Builder, Built, JailError, Shape};
use crate::process::base_env;
use crate::sys;

/// A warm jail left unused this long is torn down.
const IDLE_MAX: Duration = Duration::from_secs(60);

/// One built jail waiting for its program.
pub(super) struct Warm {
    pub built: Built,
    pub applied: AppliedLimits,
    pub notes: Vec<String>,
    /// Our end of the boot script's stdin (a stream socket).
    pub go: OwnedFd,
    /// When it was built.
    pub built_at: Instant,
    /// The interpreter has said it is waiting for the program.
    pub ready: bool,
    pub shape: Shape,
}

impl Warm {
    /// Has the interpreter said it is waiting? Reads its one-byte signal without blocking.
    pub fn ready(&mut self) -> bool {
        if !self.ready {
            let mut byte = [0u8; 1];
            // SAFETY: recv into a buffer we own, on a socket we own; MSG_DONTWAIT never blocks.
            let n = unsafe {
                libc::recv(
                    self.go.as_raw_fd(),
                    byte.as_mut_ptr().cast(),
                    1,
                    libc::MSG_DONTWAIT,
                )
            };
            self.ready = n == 1;
        }
        self.ready
    }

    /// The helper is still running (its pidfd is not readable).
    fn alive(&self) -> bool {
        sys::poll(&[self.built.spawned.child.pidfd.as_raw_fd()], 0).is_ok_and(|r| r[0] == 0)
    }

    /// Kill it and remove what it left (cgroup, run directory).
    fn discard(self) {
        let pid = self.built.spawned.child.pid;
        // The namespace init dies with the helper (PDEATHSIG), and the PID namespace with it.
        sys::kill(pid, libc::SIGKILL);
        if let Some(cg) = &self.built.cgroup {
            cg.kill_all();
        }
        let _ = sys::wait4(pid);
        drop(self);
    }
}

struct Shared {
    idle: Mutex<Vec<Warm>>,
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Warm>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) struct Pool {
    shared: Arc<Shared>,
    tx: Option<mpsc::Sender<Shape>>,
    thread: Option<JoinHandle<()>>,
}

impl Pool {
    pub fn start(builder: Arc<Builder>, capacity: usize) -> Pool {
        let shared = Arc::new(Shared {
            idle: Mutex::new(Vec::new()),
            capacity,
        });
        let (tx, rx) = mpsc::channel::<Shape>();
        let thread_shared = shared.clone();
        // The thread that builds lives as long as the pool: the helpers it starts carry
        // PDEATHSIG, which follows the thread that forked them, not the process.
        let thread = std::thread::Builder::new()
            .name("fleetbox-warm".into())
            .spawn(move || builder_loop(&builder, &thread_shared, &rx));
        match thread {
            Ok(handle) => Pool {
                shared,
                tx: Some(tx),
                thread: Some(handle),
            },
            Err(e) => {
                tracing::warn!(error = %e, "could not start the warm jail builder; every run starts cold");
                Pool {
                    shared,
                    tx: None,
                    thread: None,
                }
            }
        }
    }

    /// A live warm jail built for exactly this shape, if one is waiting.
    pub fn take(&self, shape: &Shape) -> Option<Warm> {
        loop {
            let found = {
                let mut idle = self.shared.lock();
                let i = idle.iter().position(|w| &w.shape == shape)?;
                idle.remove(i)
            };
            if found.alive() {
                return Some(found);
            }
            found.discard();
        }
    }

    /// How many jails of this shape have their interpreter waiting.
    pub fn ready(&self, shape: &Shape) -> usize {
        self.shared
            .lock()
            .iter_mut()
            .filter(|w| &w.shape == shape)
            .map(|w| w.ready())
            .filter(|ready| *ready)
            .count()
    }

    /// How many jails, of any shape, are built and waiting for a run.
    pub fn waiting(&self) -> usize {
        self.shared.lock().len()
    }

    /// Ask for a jail of this shape to be built (unless enough are waiting already).
    pub fn refill(&self, shape: &Shape) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(shape.clone());
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let idle = std::mem::take(&mut *self.shared.lock());
        for w in idle {
            w.discard();
        }
    }
}

fn builder_loop(builder: &Builder, shared: &Shared, rx: &mpsc::Receiver<Shape>) {
    loop {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(shape)
                if shared.lock().iter().filter(|w| w.shape == shape).count() < shared.capacity =>
            {
                match build_warm(builder, shape) {
                    Ok(warm) => {
                        let evicted = {
                            let mut idle = shared.lock();
                            let evicted = (idle.len() >= shared.capacity).then(|| idle.remove(0));
                            idle.push(warm);
                            evicted
                        };
                        if let Some(old) = evicted {
                            old.discard();
                        }
                    }
                    // The next run with these limits starts cold and reports the same failure.
                    Err(e) => tracing::debug!(error = %e.error, "building a warm jail failed"),
                }
            }
            // Enough are waiting with these limits already.
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let expired: Vec<Warm> = {
            let mut idle = shared.lock();
            let (old, keep) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|w| w.built_at.elapsed() > IDLE_MAX);
            *idle = keep;
            old
        };
        for w in expired {
            w.discard();
        }
    }
}

fn build_warm(builder: &Builder, shape: Shape) -> Result<Warm, BuildError> {
    let mut applied = AppliedLimits::new(shape.limits.clone());
    let mut notes = Vec::new();
    let mut built = builder.build(
        &shape,
        b"",
        None,
        &[],
        base_env("/tmp", "/tmp"),
        true,
        &mut applied,
        &mut notes,
    )?;
    let go = built.spawned.go.take().ok_or_else(|| {
        BuildError::from(JailError::protocol("the warm jail has no program channel"))
    })?;
    Ok(Warm {
        built,
        applied,
        notes,
        go,
        built_at: Instant::now(),
        ready: false,
        shape,
    })
}
