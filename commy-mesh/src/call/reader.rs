//! The fallback reader of a client link: a parked thread that receives
//! answers while calls are pending and no caller polls (spin, yield, then
//! futex: an idle link costs no CPU), and stands by while an
//! [`AnswerDriver`](crate::embed::AnswerDriver) has the link.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use commy_core::InstanceId;
use commy_shm::link::RecvError;

use crate::call::shm::ClientConn;

/// How long the fallback reader waits on the ring before re-checking
/// whether a caller took over or nothing is pending any more.
const READER_SLICE: Duration = Duration::from_millis(20);

/// Starts the (parked) reader thread of `conn`, a link to `instance`. If
/// the thread cannot start, the link is marked dead.
pub(crate) fn spawn(conn: &Arc<ClientConn>, instance: InstanceId) {
    let weak = Arc::downgrade(conn);
    let spawned = std::thread::Builder::new()
        .name(format!("commy-client-{instance}"))
        .spawn(move || client_reader(weak));
    match spawned {
        Ok(handle) => {
            let _ = conn.reader.set(handle.thread().clone());
        }
        Err(e) => {
            tracing::error!("cannot start a link reader thread: {e}");
            conn.alive.store(false, Ordering::Release);
        }
    }
}

/// How long a reader that delivered callback calls' answers waits on the
/// ring for more once none is pending, before it parks.
const READER_LINGER: Duration = Duration::from_millis(1);

/// How long an [`AnswerDriver`] may leave a link it has unpolled before the
/// link's reader receives for it; also the reader's nap while it stands by.
const DRIVER_STUCK_AFTER: Duration = Duration::from_millis(2);

/// Naps ([`DRIVER_STUCK_AFTER`] each) an idle reader of a link an
/// [`AnswerDriver`] has had takes before it parks with no timeout: while
/// calls keep coming, claiming the link again wakes nobody.
const IDLE_NAPS: u32 = 25;

/// The fallback reader: while calls are pending and no caller polls, it
/// waits on the ring and completes responses; otherwise it stays parked
/// (after answering callback calls, once [`READER_LINGER`] passed with none
/// pending). While an [`AnswerDriver`] has the link it stands by
/// ([`stand_by`]).
fn client_reader(conn: Weak<ClientConn>) {
    let mut delivered = 0u32;
    let mut naps = 0u32;
    // Set while the reader delivers the answers of callback calls: once
    // none is pending, it waits on the ring a while longer.
    let mut linger = false;
    loop {
        {
            let Some(c) = conn.upgrade() else { return };
            c.driving.asleep.store(false, Ordering::Relaxed);
            let mut earliest = c.expire();
            loop {
                if !c.is_alive() {
                    return;
                }
                c.answer_go_away();
                if c.driving.driven.load(Ordering::Acquire) {
                    naps = 0;
                    if !stand_by(&c, &mut earliest) {
                        return;
                    }
                    continue;
                }
                if c.pollers.load(Ordering::Acquire) > 0 {
                    break;
                }
                let pending = c.pending_len.load(Ordering::Acquire) > 0;
                // After answering callback calls, the reader waits on the
                // ring a while longer once none is pending: callback calls
                // come one after another, and the next one's answer is
                // taken by a reader still waiting, so the call wakes nobody.
                if !pending && !std::mem::take(&mut linger) {
                    break;
                }
                naps = 0;
                let check = {
                    let mut rx = c.rx.lock();
                    let now = Instant::now();
                    let until = if pending {
                        let slice = now + READER_SLICE;
                        earliest.map_or(slice, |e| e.min(slice))
                    } else {
                        now + READER_LINGER
                    };
                    match rx.recv(Some(until)) {
                        Ok(msg) => {
                            if c.deliver(&msg, None).is_err() {
                                return;
                            }
                            linger = c.driving.callbacks.load(Ordering::Relaxed);
                            // Deadlines are checked every so many answers,
                            // and whenever the ring stays empty until one.
                            delivered = delivered.wrapping_add(1);
                            earliest.is_some() && delivered.is_multiple_of(64)
                        }
                        Err(RecvError::TimedOut) => pending,
                        Err(e) => {
                            let _ = c.fail(e);
                            return;
                        }
                    }
                };
                if check
                    || (c.sooner.load(Ordering::Relaxed) && c.sooner.swap(false, Ordering::AcqRel))
                {
                    earliest = c.expire();
                }
            }
            if c.driving.was_driven.load(Ordering::Relaxed) && naps < IDLE_NAPS {
                naps += 1;
                drop(c);
                std::thread::park_timeout(DRIVER_STUCK_AFTER);
                continue;
            }
            // SYNC: see `ClientConn::claim`.
            c.driving.asleep.store(true, Ordering::SeqCst);
            if c.driving.driven.load(Ordering::SeqCst) {
                continue;
            }
        }
        std::thread::park();
    }
}

/// The reader's part while an [`AnswerDriver`] has its link: it naps, keeps
/// the callback calls' deadlines, and receives for the driver while that
/// leaves the link unpolled for [`DRIVER_STUCK_AFTER`] or more. Returns
/// once the driver gives the link back (true), or the link failed (false).
pub(crate) fn stand_by(c: &ClientConn, earliest: &mut Option<Instant>) -> bool {
    c.driving.polled.store(false, Ordering::Release);
    let mut seen = Instant::now();
    loop {
        let nap = earliest.map_or(DRIVER_STUCK_AFTER, |e| {
            e.saturating_duration_since(Instant::now())
                .min(DRIVER_STUCK_AFTER)
        });
        std::thread::park_timeout(nap);
        if !c.is_alive() {
            return false;
        }
        c.answer_go_away();
        let now = Instant::now();
        if earliest.is_some_and(|e| e <= now) || c.sooner.swap(false, Ordering::AcqRel) {
            *earliest = c.expire();
        }
        if !c.driving.driven.load(Ordering::Acquire) {
            return true;
        }
        if c.driving.polled.swap(false, Ordering::AcqRel) {
            seen = now;
            continue;
        }
        if now.duration_since(seen) < DRIVER_STUCK_AFTER {
            continue;
        }
        // Not polled for a while: receive until the driver polls again.
        // Held by a caller polling: it completes what it finds.
        let Some(mut rx) = c.rx.try_lock() else {
            continue;
        };
        while !c.driving.polled.load(Ordering::Acquire) && c.driving.driven.load(Ordering::Acquire)
        {
            let slice = Instant::now() + DRIVER_STUCK_AFTER;
            match rx.recv(Some(earliest.map_or(slice, |e| e.min(slice)))) {
                Ok(msg) => {
                    if c.deliver(&msg, None).is_err() {
                        return false;
                    }
                }
                // A deadline, the slice's end, or a call registered with a
                // sooner deadline (which interrupts the wait).
                Err(RecvError::TimedOut) => {
                    if earliest.is_some_and(|e| e <= Instant::now())
                        || c.sooner.swap(false, Ordering::AcqRel)
                    {
                        *earliest = c.expire();
                    }
                }
                Err(e) => {
                    let _ = c.fail(e);
                    return false;
                }
            }
        }
        seen = Instant::now();
    }
}
