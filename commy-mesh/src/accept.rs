//! The accept loop of the Unix sockets that announce instances (services
//! and topic subscriptions): one thread per process waits on all of them
//! with epoll, so idle services cost nothing (no thread and no timer each).
//! Each accepted link's handshake and work run on a thread of their own,
//! so a silent client cannot hold up others. A failing accept (out of
//! descriptors) backs off ([`AcceptBackoff`]) instead of spinning, and is
//! logged a few times, not per attempt.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::path::{Path, PathBuf};

use commy_core::backoff::AcceptBackoff;
use commy_core::{InstanceId, ServiceName, Status};
use commy_discovery::LocalRegistry;
use commy_shm::uds::BindError;
use commy_shm::{LinkConfig, ShmLink, UdsListener};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use rustix::event::{EventfdFlags, epoll, eventfd};

use crate::warn::Warnings;

/// How often listeners with a check ([`start_accepting`]'s `go_on`) are
/// asked whether they go on.
const TICK: Duration = Duration::from_millis(100);

/// How often the loop looks for stopped listeners when nothing wakes it.
const SWEEP: Duration = Duration::from_secs(1);

/// The epoll data of the wake-up eventfd (listeners count from 1).
const WAKE: u64 = 0;

/// One listener of the loop.
struct Entry {
    listener: UdsListener,
    link: LinkConfig,
    name: String,
    stop: Arc<AtomicBool>,
    on_link: Arc<dyn Fn(ShmLink) + Send + Sync>,
    /// Asked every [`TICK`] whether the listener goes on.
    go_on: Option<Box<dyn Fn() -> bool + Send + Sync>>,
    /// Refused handshakes are logged a few at a time (they run on the
    /// links' threads).
    refusals: Arc<Warnings>,
    backoff: AcceptBackoff,
    /// Set while accepting failed: the listener is not watched until then.
    retry_at: Option<Instant>,
}

/// The process's accept loop.
struct Acceptor {
    /// The process it runs in (a forked child makes its own).
    pid: u32,
    epoll: OwnedFd,
    /// Written to wake the loop (a listener was added or stopped).
    wake: OwnedFd,
    entries: Mutex<FxHashMap<u64, Entry>>,
    next: AtomicU64,
}

/// The process's accept loop, made by the first listener.
static ACCEPTOR: Mutex<Option<Arc<Acceptor>>> = Mutex::new(None);

fn acceptor() -> Result<Arc<Acceptor>, Status> {
    let mut slot = ACCEPTOR.lock();
    let pid = std::process::id();
    if let Some(a) = slot.as_ref()
        && a.pid == pid
    {
        return Ok(a.clone());
    }
    // None yet, or one inherited through fork from a parent whose accept
    // thread did not come along: this process makes its own. The inherited
    // listeners are the parent's (dropping them here would remove its
    // sockets), so the inherited loop is left as it is.
    if let Some(inherited) = slot.take() {
        std::mem::forget(inherited);
    }
    let made =
        Acceptor::new(pid).map_err(|e| Status::internal(format!("cannot accept links: {e}")))?;
    let a = Arc::new(made);
    let looped = a.clone();
    std::thread::Builder::new()
        .name("commy-accept".into())
        .spawn(move || looped.run())
        .map_err(|e| Status::internal(format!("cannot start the accept thread: {e}")))?;
    *slot = Some(a.clone());
    Ok(a)
}

/// Accepts links on `listener` until `stop` is set or `go_on`, asked
/// every tenth of a second, says no; each link is handed to `on_link` on a
/// thread of its own (named after `name`), the handshake included. The
/// listener is closed once it stops ([`withdraw`] after setting `stop`
/// closes it at once, else within a second).
pub(crate) fn start_accepting(
    listener: UdsListener,
    link: LinkConfig,
    name: String,
    stop: Arc<AtomicBool>,
    on_link: impl Fn(ShmLink) + Send + Sync + 'static,
    go_on: Option<Box<dyn Fn() -> bool + Send + Sync>>,
) -> Result<(), Status> {
    let a = acceptor()?;
    let id = a.next.fetch_add(1, Ordering::Relaxed);
    let ticks = go_on.is_some();
    // Under the lock: the loop looks the listener up when it is ready.
    let mut entries = a.entries.lock();
    let watched = epoll::add(
        &a.epoll,
        &listener,
        epoll::EventData::new_u64(id),
        epoll::EventFlags::IN | epoll::EventFlags::ONESHOT,
    );
    if let Err(e) = watched {
        return Err(Status::internal(format!(
            "{name}: cannot watch the listener: {e}"
        )));
    }
    entries.insert(
        id,
        Entry {
            listener,
            link,
            name,
            stop,
            on_link: Arc::new(on_link),
            go_on,
            refusals: Arc::new(Warnings::new()),
            backoff: AcceptBackoff::new(),
            retry_at: None,
        },
    );
    drop(entries);
    if ticks {
        // The loop may sleep for a whole sweep: it ticks from now on.
        wake_acceptor();
    }
    Ok(())
}

/// Binds the socket that announces instance `id` of `name` (a service, or
/// a topic's subscriber set) in `registry`; `what` names it in errors.
/// Another process tidying up may remove the (empty) directory between its
/// creation and the bind ([`LocalRegistry::tidy`]): the directory is made
/// and the bind tried again then.
pub(crate) fn bind_announcement(
    registry: &LocalRegistry,
    name: &ServiceName,
    id: InstanceId,
    what: &str,
) -> Result<(PathBuf, UdsListener), Status> {
    let mut tries = 0;
    loop {
        let path = registry
            .socket_path(name, id)
            .map_err(|e| Status::unavailable(format!("cannot announce {what}: {e}")))?;
        match UdsListener::bind(&path) {
            Ok(listener) => return Ok((path, listener)),
            Err(BindError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && tries < BIND_TRIES =>
            {
                tries += 1;
            }
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "cannot listen for {what}: {e}"
                )));
            }
        }
    }
}

/// Binds tried again when the announcement's directory vanished.
const BIND_TRIES: u32 = 3;

/// Takes back the announcement at `socket` (its `stop` just set): the
/// socket is removed, so discovery sees the instance vanish at once; its
/// directory too if that is now empty (the last instance of its service,
/// or subscription of its set, on this host), then the mesh's directory
/// above it if that is empty too (see [`LocalRegistry::tidy`]); and the
/// accept loop closes the listener now.
pub(crate) fn withdraw(socket: &Path) {
    let _ = std::fs::remove_file(socket);
    let mut dirs = socket.ancestors().skip(1).take(2);
    while let Some(dir) = dirs.next()
        && std::fs::remove_dir(dir).is_ok()
    {}
    wake_acceptor();
}

/// Wakes the accept loop, so that a listener whose `stop` was just set is
/// closed now.
fn wake_acceptor() {
    if let Some(a) = ACCEPTOR.lock().as_ref()
        && a.pid == std::process::id()
    {
        let _ = rustix::io::write(&a.wake, &1u64.to_ne_bytes());
    }
}

impl Acceptor {
    /// An accept loop for process `pid`, not running yet.
    fn new(pid: u32) -> Result<Acceptor, String> {
        let epoll =
            epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| format!("epoll_create: {e}"))?;
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| format!("eventfd: {e}"))?;
        epoll::add(
            &epoll,
            &wake,
            epoll::EventData::new_u64(WAKE),
            epoll::EventFlags::IN,
        )
        .map_err(|e| format!("epoll_ctl: {e}"))?;
        Ok(Acceptor {
            pid,
            epoll,
            wake,
            entries: Mutex::new(FxHashMap::default()),
            next: AtomicU64::new(WAKE + 1),
        })
    }

    /// The loop, on its own thread.
    fn run(&self) {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(64);
        let mut next_tick = Instant::now();
        loop {
            let timeout = self.timeout(next_tick);
            events.clear();
            let ts = rustix::time::Timespec::try_from(timeout).unwrap_or(rustix::time::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            });
            match epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                Some(&ts),
            ) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    // An epoll fd that stops working is unrecoverable.
                    tracing::error!("the accept loop stopped: epoll_wait: {e}");
                    return;
                }
            }
            for ev in &events {
                match ev.data.u64() {
                    WAKE => {
                        let mut buf = [0u8; 8];
                        let _ = rustix::io::read(&self.wake, &mut buf);
                    }
                    id => self.ready(id),
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                self.sweep(now);
                next_tick = now + TICK;
            }
        }
    }

    /// How long the loop may sleep: until the next tick while a listener
    /// has a check or waits to retry, else a sweep.
    fn timeout(&self, next_tick: Instant) -> Duration {
        let entries = self.entries.lock();
        let busy = entries
            .values()
            .any(|e| e.go_on.is_some() || e.retry_at.is_some());
        if busy {
            next_tick.saturating_duration_since(Instant::now())
        } else {
            SWEEP
        }
    }

    /// Closes stopped listeners, asks the others with a check whether they
    /// go on, and retries those whose accept failed once their wait is over.
    fn sweep(&self, now: Instant) {
        let mut retry = Vec::new();
        let mut entries = self.entries.lock();
        entries.retain(|id, e| {
            let go_on = !e.stop.load(Ordering::Acquire) && e.go_on.as_ref().is_none_or(|f| f());
            if go_on && e.retry_at.is_some_and(|t| t <= now) {
                retry.push(*id);
            }
            if !go_on {
                let _ = epoll::delete(&self.epoll, e.listener.as_fd());
            }
            go_on
        });
        drop(entries);
        for id in retry {
            self.ready(id);
        }
    }

    /// Accepts what waits on listener `id`, then watches it again (or, if
    /// accepting failed, waits before trying again).
    fn ready(&self, id: u64) {
        let mut entries = self.entries.lock();
        let Some(e) = entries.get_mut(&id) else {
            return;
        };
        if e.stop.load(Ordering::Acquire) {
            let _ = epoll::delete(&self.epoll, e.listener.as_fd());
            entries.remove(&id);
            return;
        }
        e.retry_at = None;
        loop {
            match e.listener.try_accept() {
                Ok(Some((sock, _peer))) => {
                    if let Some(n) = e.backoff.succeeded() {
                        tracing::info!("{}: accepting again after {n} failed accepts", e.name);
                    }
                    let (on_link, link, name) = (e.on_link.clone(), e.link.clone(), e.name.clone());
                    let refusals = e.refusals.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("commy-link-{}", e.name))
                        .spawn(move || match ShmLink::accept_stream(sock, &link) {
                            Ok(l) => on_link(l),
                            Err(err) => {
                                refusals.warn(|| format!("{name}: refused a connection: {err}"));
                            }
                        });
                    if let Err(err) = spawned {
                        tracing::error!("cannot start a link thread: {err}");
                    }
                }
                Ok(None) => {
                    let rearmed = epoll::modify(
                        &self.epoll,
                        &e.listener,
                        epoll::EventData::new_u64(id),
                        epoll::EventFlags::IN | epoll::EventFlags::ONESHOT,
                    );
                    if let Err(err) = rearmed {
                        tracing::error!("{}: cannot watch the listener again: {err}", e.name);
                        entries.remove(&id);
                    }
                    return;
                }
                Err(commy_shm::uds::AcceptError::PeerCred { source, .. }) => {
                    // That connection is closed; the listener is fine.
                    e.refusals
                        .warn(|| format!("{}: refused a connection: {source}", e.name));
                }
                Err(err) => {
                    let now = Instant::now();
                    let after = e.backoff.failed(now);
                    if let Some(n) = after.report {
                        tracing::warn!(
                            "{}: {err} ({n} failed accepts since the last report; \
                             retrying every {:?} at most)",
                            e.name,
                            AcceptBackoff::MAX
                        );
                    }
                    e.retry_at = Some(now + after.wait);
                    return;
                }
            }
        }
    }
}
