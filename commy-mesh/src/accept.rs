//! The accept loop of the Unix sockets that announce instances (services
//! and topic subscriptions): one thread per process waits on all of them
//! with epoll, so idle services cost nothing (no thread and no timer each).
//! A listener with a check (a subscription asking whether a publisher cut
//! it) is asked when its announcement's directory changes, which the loop
//! learns through inotify; only where no watch could be added is it asked
//! every [`TICK`].
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

/// The epoll data of the inotify instance that watches the directories of
/// listeners with a check.
const NOTIFY: u64 = u64::MAX;

/// One listener of the loop.
struct Entry {
    listener: UdsListener,
    link: LinkConfig,
    name: String,
    stop: Arc<AtomicBool>,
    on_link: Arc<dyn Fn(ShmLink) + Send + Sync>,
    /// Asked whether the listener goes on: when its directory changes
    /// (`watched`), else every [`TICK`].
    go_on: Option<Box<dyn Fn() -> bool + Send + Sync>>,
    /// The directory of its socket, while watched for changes.
    watched: Option<PathBuf>,
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
    /// Watches the directories of listeners with a check, if inotify works
    /// here; each directory's watch and how many listeners use it.
    notify: Option<Mutex<Watched>>,
}

/// The directories an [`Acceptor`]'s inotify instance watches.
struct Watched {
    inotify: inotify::Inotify,
    dirs: FxHashMap<PathBuf, (inotify::WatchDescriptor, usize)>,
}

impl Watched {
    /// Watches `dir` (once for all its listeners); false if it cannot.
    fn add(&mut self, dir: &Path) -> bool {
        if let Some((_, n)) = self.dirs.get_mut(dir) {
            *n += 1;
            return true;
        }
        use inotify::WatchMask;
        let mask =
            WatchMask::DELETE | WatchMask::MOVED_FROM | WatchMask::DELETE_SELF | WatchMask::ONLYDIR;
        match self.inotify.watches().add(dir, mask) {
            Ok(wd) => {
                self.dirs.insert(dir.to_owned(), (wd, 1));
                true
            }
            Err(e) => {
                tracing::debug!(
                    "cannot watch {} ({e}); checking it on a timer",
                    dir.display()
                );
                false
            }
        }
    }

    /// One listener of `dir` no longer needs its watch.
    fn release(&mut self, dir: &Path) {
        if let Some((wd, n)) = self.dirs.get_mut(dir) {
            *n -= 1;
            if *n == 0 {
                let wd = wd.clone();
                self.dirs.remove(dir);
                // Gone already if the directory was removed.
                let _ = self.inotify.watches().remove(wd);
            }
        }
    }

    /// Takes what the instance has to say: look again, and which watches
    /// ended with their directory (a directory made again later is
    /// watched anew; meanwhile its listeners are asked at each sweep).
    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        let mut ended = Vec::new();
        while let Ok(events) = self.inotify.read_events(&mut buf) {
            let before = ended.len();
            let mut any = false;
            for ev in events {
                any = true;
                if ev.mask.contains(inotify::EventMask::IGNORED) {
                    ended.push(ev.wd.clone());
                }
            }
            if !any && ended.len() == before {
                break;
            }
        }
        self.dirs.retain(|_, (wd, _)| !ended.contains(wd));
    }
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
    // A check is asked when the socket's directory changes, if that can be
    // watched; else on every tick.
    let watched = match (&go_on, &a.notify, listener.path().parent()) {
        (Some(_), Some(notify), Some(dir)) if notify.lock().add(dir) => Some(dir.to_owned()),
        _ => None,
    };
    let ticks = go_on.is_some() && watched.is_none();
    // Under the lock: the loop looks the listener up when it is ready.
    let mut entries = a.entries.lock();
    let added = epoll::add(
        &a.epoll,
        &listener,
        epoll::EventData::new_u64(id),
        epoll::EventFlags::IN | epoll::EventFlags::ONESHOT,
    );
    if let Err(e) = added {
        if let (Some(dir), Some(notify)) = (&watched, &a.notify) {
            notify.lock().release(dir);
        }
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
            watched,
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
        // Without inotify (or with too few instances left), checks tick.
        let notify = inotify::Inotify::init()
            .and_then(|inotify| {
                epoll::add(
                    &epoll,
                    inotify.as_fd(),
                    epoll::EventData::new_u64(NOTIFY),
                    epoll::EventFlags::IN,
                )?;
                Ok(inotify)
            })
            .map_err(|e| tracing::debug!("no inotify for the accept loop ({e}); checks tick"))
            .ok()
            .map(|inotify| {
                Mutex::new(Watched {
                    inotify,
                    dirs: FxHashMap::default(),
                })
            });
        Ok(Acceptor {
            pid,
            epoll,
            wake,
            entries: Mutex::new(FxHashMap::default()),
            next: AtomicU64::new(WAKE + 1),
            notify,
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
            let mut changed = false;
            for ev in &events {
                match ev.data.u64() {
                    WAKE => {
                        let mut buf = [0u8; 8];
                        let _ = rustix::io::read(&self.wake, &mut buf);
                    }
                    NOTIFY => {
                        if let Some(notify) = &self.notify {
                            notify.lock().drain();
                        }
                        changed = true;
                    }
                    id => self.ready(id),
                }
            }
            let now = Instant::now();
            if changed || now >= next_tick {
                self.sweep(now);
                next_tick = now + TICK;
            }
        }
    }

    /// How long the loop may sleep: until the next tick while a listener
    /// has a check nothing watches or waits to retry, else a sweep.
    fn timeout(&self, next_tick: Instant) -> Duration {
        let entries = self.entries.lock();
        let busy = entries
            .values()
            .any(|e| (e.go_on.is_some() && e.watched.is_none()) || e.retry_at.is_some());
        if busy {
            next_tick.saturating_duration_since(Instant::now())
        } else {
            SWEEP
        }
    }

    /// Stops watching listener `e` (it is being removed): its socket and
    /// its directory.
    fn forget(&self, e: &Entry) {
        let _ = epoll::delete(&self.epoll, e.listener.as_fd());
        if let (Some(dir), Some(notify)) = (&e.watched, &self.notify) {
            notify.lock().release(dir);
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
                self.forget(e);
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
            self.forget(e);
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
                        self.forget(e);
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
