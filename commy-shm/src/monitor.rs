//! The liveness monitor: one background thread per process that watches the
//! Unix sockets of all shared-memory links with epoll and reports the moment
//! a peer's socket hangs up (the peer closed it or its process died).
//!
//! Waiters sleeping on a futex in shared memory cannot also wait on a
//! socket, so the monitor sets the link's `peer_gone` flag and wakes the
//! futex words itself: a `kill -9` of the peer is noticed at once, while idle
//! links cost no CPU at all.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};

use rustix::event::epoll;

type Callback = Box<dyn Fn() + Send + Sync>;

struct Monitor {
    epoll: OwnedFd,
    watches: Mutex<HashMap<u64, Arc<Callback>>>,
    next: Mutex<u64>,
}

static MONITOR: OnceLock<Result<Monitor, String>> = OnceLock::new();

fn monitor() -> Result<&'static Monitor, std::io::Error> {
    let m = MONITOR.get_or_init(|| {
        let epoll =
            epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| format!("epoll_create: {e}"))?;
        std::thread::Builder::new()
            .name("commy-liveness".into())
            .spawn(run)
            .map_err(|e| format!("spawning the liveness thread: {e}"))?;
        Ok(Monitor {
            epoll,
            watches: Mutex::new(HashMap::new()),
            next: Mutex::new(1),
        })
    });
    m.as_ref().map_err(|e| std::io::Error::other(e.clone()))
}

fn run() {
    // The thread may start before `MONITOR` is set; `get()` waits for it.
    let m = loop {
        if let Some(m) = MONITOR.get() {
            match m {
                Ok(m) => break m,
                Err(_) => return,
            }
        }
        std::thread::yield_now();
    };
    let mut events: Vec<epoll::Event> = Vec::with_capacity(64);
    loop {
        events.clear();
        if let Err(e) = epoll::wait(&m.epoll, rustix::buffer::spare_capacity(&mut events), None) {
            if e == rustix::io::Errno::INTR {
                continue;
            }
            // An epoll fd that stops working is unrecoverable; waiters still
            // notice dead peers through their own checks on the next call.
            return;
        }
        for ev in &events {
            let id = ev.data.u64();
            let cb = m.watches.lock().ok().and_then(|w| w.get(&id).cloned());
            if let Some(cb) = cb {
                cb();
            }
        }
    }
}

/// Keeps a socket watched; dropping it stops the watch.
pub(crate) struct Watch {
    id: u64,
    fd: OwnedFd,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("id", &self.id).finish()
    }
}

/// Calls `on_hangup` (once) from the monitor thread when the peer of `sock`
/// hangs up.
pub(crate) fn watch(
    sock: BorrowedFd<'_>,
    on_hangup: impl Fn() + Send + Sync + 'static,
) -> Result<Watch, std::io::Error> {
    let m = monitor()?;
    // Watch a duplicate so the registration is tied to our own descriptor,
    // whatever the owner of `sock` does with it.
    let fd = sock.try_clone_to_owned()?;
    let id = {
        let mut n = m
            .next
            .lock()
            .map_err(|_| std::io::Error::other("monitor poisoned"))?;
        *n += 1;
        *n
    };
    m.watches
        .lock()
        .map_err(|_| std::io::Error::other("monitor poisoned"))?
        .insert(id, Arc::new(Box::new(on_hangup)));
    let flags = epoll::EventFlags::RDHUP | epoll::EventFlags::HUP | epoll::EventFlags::ONESHOT;
    if let Err(e) = epoll::add(&m.epoll, &fd, epoll::EventData::new_u64(id), flags) {
        if let Ok(mut w) = m.watches.lock() {
            w.remove(&id);
        }
        return Err(e.into());
    }
    Ok(Watch { id, fd })
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Ok(m) = monitor() {
            let _ = epoll::delete(&m.epoll, self.fd.as_fd());
            if let Ok(mut w) = m.watches.lock() {
                w.remove(&self.id);
            }
        }
    }
}
