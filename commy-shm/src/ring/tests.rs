//! The ring's unit tests (real memory; the loom models are in
//! `loom_tests.rs`).

use super::*;
use std::collections::VecDeque;

fn ctl(c: &Consumer) -> &RingCtl {
    c.mem.ctl()
}

fn pattern(seq: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seq as usize * 31 + i) as u8).collect()
}

#[test]
fn send_and_receive_in_order_with_wrap() {
    let (mut tx, mut rx) = pair(256).unwrap();
    for round in 0..1000u64 {
        let len = (round as usize * 7) % 100;
        tx.try_send(&pattern(round, len)).unwrap();
        let m = rx.try_recv().unwrap().unwrap();
        assert_eq!(&*m, &pattern(round, len)[..]);
    }
    assert!(rx.try_recv().unwrap().is_none());
}

#[test]
fn full_and_too_large() {
    let (mut tx, mut rx) = pair(64).unwrap();
    // 64 bytes less the header and the zeroed slot after the record.
    assert_eq!(tx.max_payload(), 48);
    assert!(matches!(
        tx.reserve(49),
        Err(ReserveError::TooLarge { len: 49, max: 48 })
    ));
    tx.try_send(&[1; 24]).unwrap(); // 32 bytes at 0
    tx.try_send(&[2; 16]).unwrap(); // 24 bytes at 32; 8 left for the zeroed slot
    assert!(matches!(tx.try_send(&[3]), Err(ReserveError::Full { .. })));
    assert_eq!(&*rx.try_recv().unwrap().unwrap(), &[1; 24]);
    // A 48-byte record needs the whole ring: not yet.
    assert!(matches!(
        tx.try_send(&[4; 48]),
        Err(ReserveError::Full { .. })
    ));
    assert_eq!(&*rx.try_recv().unwrap().unwrap(), &[2; 16]);
    // Still full: the record must start at offset 0, so the producer
    // published a padding record, which the consumer skips first.
    assert!(matches!(
        tx.try_send(&[4; 48]),
        Err(ReserveError::Full { .. })
    ));
    assert!(rx.try_recv().unwrap().is_none());
    tx.try_send(&[4; 48]).unwrap();
    assert_eq!(&*rx.try_recv().unwrap().unwrap(), &[4; 48]);
}

#[test]
fn staged_records_are_invisible_until_published() {
    let (mut tx, mut rx) = pair(1024).unwrap();
    for i in 0..5u8 {
        tx.reserve(3).unwrap().fill(&[i; 3]).stage();
    }
    assert_eq!(tx.staged(), 5 * 16);
    assert!(rx.try_recv().unwrap().is_none());
    tx.publish();
    let mut got = vec![];
    assert_eq!(
        rx.recv_batch(usize::MAX, |_, m| got.push(m.to_vec()))
            .unwrap(),
        5
    );
    assert_eq!(got, (0..5u8).map(|i| vec![i; 3]).collect::<Vec<_>>());
}

#[test]
fn zero_copy_loan_and_truncate_and_tags() {
    let (mut tx, mut rx) = pair(1024).unwrap();
    let mut loan = tx.reserve_tagged(100, 7).unwrap().zeroed();
    loan.bytes_mut()[..4].copy_from_slice(b"abcd");
    loan.truncate(4);
    loan.commit();
    let m = rx.try_recv().unwrap().unwrap();
    assert_eq!(m.tag(), 7);
    assert_eq!(&*m, b"abcd");
}

#[test]
fn loan_filled_from_parts() {
    let (mut tx, mut rx) = pair(1024).unwrap();
    tx.reserve_tagged(9, 0)
        .unwrap()
        .fill_parts(&[b"head", b"", b"body!"])
        .commit();
    assert_eq!(&*rx.try_recv().unwrap().unwrap(), b"headbody!");
}

#[test]
#[should_panic(expected = "differs from the reservation")]
fn loan_parts_must_add_up() {
    let (mut tx, _rx) = pair(1024).unwrap();
    let _ = tx.reserve_tagged(9, 0).unwrap().fill_parts(&[b"head"]);
}

#[test]
fn space_released_later_comes_back_on_release() {
    let (mut tx, mut rx) = pair(1024).unwrap();
    tx.reserve(400).unwrap().fill(&[1; 400]).commit();
    tx.reserve(400).unwrap().fill(&[2; 400]).commit();
    rx.try_recv().unwrap().unwrap().release_later();
    // Consumed, but its space is not the producer's yet.
    assert!(matches!(tx.reserve(250), Err(ReserveError::Full { .. })));
    rx.release();
    tx.reserve(250).unwrap().fill(&[3; 250]).commit();
    assert_eq!(rx.try_recv().unwrap().unwrap()[0], 2);
    assert_eq!(rx.try_recv().unwrap().unwrap()[0], 3);
}

#[test]
fn the_producer_sees_what_the_consumer_discarded() {
    let (mut tx, rx) = pair(256).unwrap();
    assert_eq!(tx.peer_discarded(), 0);
    let counter = rx.discard_counter();
    let from_elsewhere = std::thread::spawn(move || counter.add(3));
    from_elsewhere.join().unwrap();
    rx.discard_counter().add(1);
    assert_eq!(tx.peer_discarded(), 4);
    // The count lives in the control block, beside nothing the ring
    // itself reads: records still flow.
    tx.try_send(b"x").unwrap();
    drop(rx);
    assert_eq!(tx.peer_discarded(), 4);
}

#[test]
fn an_interrupt_ends_a_sleeping_wait() {
    let (mut tx, mut rx) = pair(1024).unwrap();
    let interrupter = rx.interrupter();
    let waiter = std::thread::spawn(move || {
        let far = Instant::now() + Duration::from_secs(60);
        let woke = rx.recv(Some(far)).map(|_| ()).unwrap_err();
        (rx, woke)
    });
    // Long enough for the waiter to be asleep on the futex.
    std::thread::sleep(Duration::from_millis(50));
    interrupter.interrupt();
    let (mut rx, woke) = waiter.join().unwrap();
    assert!(matches!(woke, RecvError::TimedOut), "{woke:?}");
    // The interrupt is used up: messages come through as before.
    tx.try_send(b"after").unwrap();
    assert_eq!(&*rx.recv(None).unwrap(), b"after");
}

/// A peer that clears the `waiting` word of a sleeping consumer (so the
/// producer's publish wakes nobody) costs latency, not liveness: the
/// sleeper re-checks the ring on its own.
#[test]
fn a_sleeper_whose_waiting_word_was_cleared_still_sees_data() {
    let (mut tx, mut rx) = pair(1024).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let got = rx.recv(None).map(|m| m.to_vec());
        let _ = done_tx.send(got);
    });
    // Wait until the consumer is asleep on the futex, then clear its
    // announcement as a hostile peer would.
    fn waiting(tx: &Producer) -> &AtomicU32 {
        &tx.mem.ctl().wake.0.consumer_waiting
    }
    while waiting(&tx).load(Ordering::Relaxed) == 0 {
        std::thread::yield_now();
    }
    waiting(&tx).store(0, Ordering::Relaxed);
    tx.try_send(b"unannounced").unwrap();
    let got = done_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the consumer slept through a record");
    assert_eq!(got.unwrap(), b"unannounced");
    waiter.join().unwrap();
}

/// A peer that writes an older value over the consumer's head makes
/// the producer wait for space the consumer freed long ago, while the
/// consumer waits for records: the consumer stores its head again
/// whenever it goes to sleep, and the producer gets its space.
#[test]
fn a_head_moved_back_by_the_peer_is_stored_again() {
    let (mut tx, mut rx) = pair(1024).unwrap();
    // Fill the ring and take everything: the producer's idea of the
    // head is still where it started.
    let mut sent = 0;
    while tx.try_send(&[7; 100]).is_ok() {
        sent += 1;
    }
    for _ in 0..sent {
        rx.try_recv().unwrap().unwrap();
    }
    rx.release();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let consumer = std::thread::spawn(move || {
        let got = rx.recv(None).map(|m| m.to_vec());
        let _ = done_tx.send(got);
    });
    fn head(tx: &Producer) -> &AtomicU64 {
        &tx.mem.ctl().head.0
    }
    while tx.mem.ctl().wake.0.consumer_waiting.load(Ordering::Relaxed) == 0 {
        std::thread::yield_now();
    }
    // Back to where the producer last saw it: the ring looks full.
    head(&tx).store(0, Ordering::Relaxed);
    tx.reserve_wait(100, 0, Some(Instant::now() + Duration::from_secs(30)))
        .expect("the producer never got the space back")
        .fill(&[8; 100])
        .commit();
    let got = done_rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(got.unwrap(), vec![8; 100]);
    consumer.join().unwrap();
}

#[test]
fn an_interrupt_while_not_waiting_ends_the_next_wait_only() {
    let (mut tx, mut rx) = pair(1024).unwrap();
    rx.interrupter().interrupt();
    let far = Instant::now() + Duration::from_secs(60);
    assert!(matches!(
        rx.recv(Some(far)).map(|_| ()),
        Err(RecvError::TimedOut)
    ));
    // A message that is there is received despite an interrupt, which
    // then ends the next wait.
    tx.try_send(b"x").unwrap();
    rx.interrupter().interrupt();
    assert_eq!(&*rx.recv(Some(far)).unwrap(), b"x");
    assert!(matches!(
        rx.recv(Some(far)).map(|_| ()),
        Err(RecvError::TimedOut)
    ));
    // And the wait after that runs to its deadline.
    let soon = Instant::now() + Duration::from_millis(20);
    assert!(matches!(
        rx.recv(Some(soon)).map(|_| ()),
        Err(RecvError::TimedOut)
    ));
    assert!(Instant::now() >= soon);
}

#[test]
fn abandoned_loan_sends_nothing() {
    let (mut tx, mut rx) = pair(1024).unwrap();
    drop(tx.reserve(10).unwrap());
    tx.publish();
    assert!(rx.try_recv().unwrap().is_none());
    tx.try_send(b"x").unwrap();
    assert_eq!(&*rx.try_recv().unwrap().unwrap(), b"x");
}

#[test]
fn producer_close_delivers_everything_first() {
    let (mut tx, mut rx) = pair(1024).unwrap();
    tx.reserve(1).unwrap().fill(b"a").stage();
    tx.reserve(1).unwrap().fill(b"b").stage();
    drop(tx); // publishes staged records, then closes
    assert_eq!(&*rx.try_recv().unwrap().unwrap(), b"a");
    assert_eq!(&*rx.try_recv().unwrap().unwrap(), b"b");
    assert_eq!(rx.try_recv().unwrap_err(), RingError::Closed);
    assert_eq!(
        rx.recv(None).unwrap_err(),
        RecvError::Ring(RingError::Closed)
    );
}

#[test]
fn consumer_close_fails_the_producer() {
    let (mut tx, rx) = pair(1024).unwrap();
    drop(rx);
    assert!(matches!(
        tx.try_send(b"x"),
        Err(ReserveError::Ring(RingError::Closed))
    ));
}

#[test]
fn recv_deadline_times_out() {
    let (_tx, mut rx) = pair(1024).unwrap();
    let t = Instant::now();
    let d = t + std::time::Duration::from_millis(30);
    assert_eq!(rx.recv(Some(d)).unwrap_err(), RecvError::TimedOut);
    assert!(t.elapsed() >= std::time::Duration::from_millis(30));
}

#[test]
fn threads_stream_a_million_messages() {
    let (mut tx, mut rx) = pair(1 << 14).unwrap();
    const N: u64 = 1_000_000;
    let t = std::thread::spawn(move || {
        let mut x = 0x1234_5678u64;
        for i in 0..N {
            x = crate::segment::splitmix(x);
            let len = 8 + (x % 300) as usize;
            let mut loan = tx.reserve_wait(len, 0, None).unwrap().zeroed();
            let b = loan.bytes_mut();
            b[..8].copy_from_slice(&i.to_le_bytes());
            b[8..].fill(i as u8);
            if i % 16 == 15 {
                loan.commit();
            } else {
                loan.stage();
            }
        }
    });
    let mut next = 0u64;
    while next < N {
        rx.recv_batch_wait(64, None, |_, m| {
            assert_eq!(u64::from_le_bytes(m[..8].try_into().unwrap()), next);
            assert!(m[8..].iter().all(|&b| b == next as u8));
            next += 1;
        })
        .unwrap();
    }
    t.join().unwrap();
    assert_eq!(
        rx.recv(None).unwrap_err(),
        RecvError::Ring(RingError::Closed)
    );
}

#[test]
fn idle_waiter_sleeps_and_is_woken() {
    let (mut tx, mut rx) = pair(1024).unwrap();
    let t = std::thread::spawn(move || {
        let m = rx.recv(None).unwrap();
        m.to_vec()
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    tx.try_send(b"wake").unwrap();
    assert_eq!(t.join().unwrap(), b"wake");
}

#[test]
fn a_scribbled_tail_does_not_mislead_the_consumer() {
    let (mut tx, mut rx) = pair(256).unwrap();
    tx.try_send(b"ok").unwrap();
    ctl(&rx).tail.0.store(1 << 40, Ordering::Relaxed);
    assert_eq!(&*rx.try_recv().unwrap().unwrap(), b"ok");
    assert!(rx.try_recv().unwrap().is_none());
}

#[test]
fn a_chain_of_fake_records_cannot_run_the_consumer_forever() {
    let (mut tx, mut rx) = pair(256).unwrap();
    tx.try_send(&[0; 0]).unwrap();
    // Fill the whole ring with valid-looking headers, never zero.
    for off in (0..256).step_by(8) {
        rx.mem.write_header(off, TYPE_MSG << 32, Ordering::Relaxed);
    }
    let mut n = 0;
    let e = loop {
        match rx.recv_batch(usize::MAX, |_, _| n += 1) {
            Ok(_) => {}
            Err(e) => break e,
        }
        assert!(n < 10_000, "the consumer kept reading fake records");
    };
    assert!(matches!(e, RingError::Corrupt { .. }), "{e}");
}

/// CPU time (user + system, in clock ticks) a thread of this process has used.
fn thread_cpu_ticks(tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_waiter_uses_no_cpu() {
    let (mut tx, mut rx) = pair(1024).unwrap();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        tid_tx
            .send(rustix::thread::gettid().as_raw_nonzero().get())
            .unwrap();
        rx.recv(None).map(|m| m.to_vec())
    });
    let tid = tid_rx.recv().unwrap();
    // Past the spin and yield phases (150 us by default), it sleeps.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let before = thread_cpu_ticks(tid);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let used = thread_cpu_ticks(tid) - before;
    // Clock ticks are 10 ms: a spinning waiter would show ~50.
    assert!(
        used <= 2,
        "the waiting thread used {used} ticks of CPU in 500 ms"
    );
    tx.try_send(b"bye").unwrap();
    assert_eq!(t.join().unwrap().unwrap(), b"bye");
}

#[test]
fn corrupt_record_headers_are_errors() {
    for bad in [
        u64::MAX,
        300 | TYPE_MSG << 32,         // longer than the ring
        TYPE_PAD << 32,               // padding from offset 0
        9 << 32,                      // unknown type
        16 | TYPE_PAD << 32,          // padding that does not reach the end
        1 | TYPE_MSG << 32 | 1 << 50, // reserved bits set
    ] {
        let (mut tx, mut rx) = pair(256).unwrap();
        tx.try_send(&[0; 0]).unwrap();
        rx.mem.write_header(0, bad, Ordering::Relaxed);
        let e = rx.try_recv().unwrap_err();
        assert!(matches!(e, RingError::Corrupt { .. }), "{bad:#x}: {e}");
    }
}

#[test]
fn corrupt_head_is_an_error_for_the_producer() {
    let (mut tx, rx) = pair(64).unwrap();
    tx.try_send(&[0; 48]).unwrap();
    ctl(&rx).head.0.store(999_999, Ordering::Relaxed);
    let e = tx.try_send(b"x").unwrap_err();
    assert!(
        matches!(
            e,
            ReserveError::Ring(RingError::Corrupt {
                what: "consumer head",
                ..
            })
        ),
        "{e}"
    );
}

proptest::proptest! {
    /// Any sequence of sends, batches and receives matches a queue model.
    #[test]
    fn behaves_like_a_queue(ops in proptest::collection::vec((0u8..4, 0usize..200), 1..300)) {
        let (mut tx, mut rx) = pair(512).unwrap();
        let mut model: VecDeque<Vec<u8>> = VecDeque::new();
        let mut staged: Vec<Vec<u8>> = vec![];
        let mut seq = 0u64;
        for (op, len) in ops {
            match op {
                0 | 1 => {
                    let data = pattern(seq, len);
                    seq += 1;
                    match tx.reserve(len) {
                        Ok(l) => {
                            let l = l.fill(&data);
                            if op == 0 {
                                l.commit();
                                model.extend(staged.drain(..));
                                model.push_back(data);
                            } else {
                                l.stage();
                                staged.push(data);
                            }
                        }
                        Err(ReserveError::Full { .. }) => model.extend(staged.drain(..)),
                        Err(e) => proptest::prop_assert!(false, "{e}"),
                    }
                }
                2 => {
                    let got = rx.try_recv().unwrap().map(|m| m.to_vec());
                    proptest::prop_assert_eq!(got, model.pop_front());
                }
                _ => {
                    let mut got = vec![];
                    rx.recv_batch(len % 5 + 1, |_, m| got.push(m.to_vec())).unwrap();
                    for g in got {
                        proptest::prop_assert_eq!(Some(g), model.pop_front());
                    }
                }
            }
        }
        tx.publish();
        model.extend(staged.drain(..));
        while let Some(m) = rx.try_recv().unwrap() {
            proptest::prop_assert_eq!(Some(m.to_vec()), model.pop_front());
        }
        proptest::prop_assert!(model.is_empty());
    }
}
