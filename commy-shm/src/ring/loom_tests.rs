//! Loom models of the ring's protocol (`--cfg loom`).

use super::*;

fn drain(rx: &mut Consumer, n: usize) -> Vec<Vec<u8>> {
    let mut got = vec![];
    while got.len() < n {
        let m = rx.recv(None).unwrap();
        got.push(m.to_vec());
    }
    got
}

/// Messages cross the wrap point (padding record) in order and intact,
/// with the producer waiting for space on a tiny ring.
#[test]
fn loom_wrap_and_full() {
    loom::model(|| {
        let (mut tx, mut rx) = pair(64).unwrap();
        let t = loom::thread::spawn(move || {
            tx.send(&[1; 20]).unwrap(); // 32 bytes at 0
            tx.send(&[2; 20]).unwrap(); // 32 bytes at 32: ring full
            tx.send(&[3; 30]).unwrap(); // 40 bytes: waits, then at 0
        });
        let got = drain(&mut rx, 3);
        assert_eq!(got, vec![vec![1; 20], vec![2; 20], vec![3; 30]]);
        t.join().unwrap();
    });
}

/// A staged batch becomes visible all at once, and batched release frees
/// the space for the producer.
#[test]
fn loom_batch() {
    loom::model(|| {
        let (mut tx, mut rx) = pair(64).unwrap();
        let t = loom::thread::spawn(move || {
            tx.reserve(8).unwrap().fill(&[1; 8]).stage();
            tx.reserve(8).unwrap().fill(&[2; 8]).stage();
            tx.publish();
            tx.send(&[3; 40]).unwrap(); // needs the batch released
        });
        let mut got = vec![];
        while got.len() < 3 {
            rx.recv_batch(8, |_, m| got.push(m.to_vec())).unwrap();
            loom::thread::yield_now();
        }
        // The first two arrive together: never one without the other.
        assert_eq!(got, vec![vec![1; 8], vec![2; 8], vec![3; 40]]);
        t.join().unwrap();
    });
}

/// Close after sends: the consumer sees every record, then Closed.
#[test]
fn loom_close() {
    loom::model(|| {
        let (mut tx, mut rx) = pair(64).unwrap();
        let t = loom::thread::spawn(move || {
            tx.send(b"last").unwrap();
            drop(tx);
        });
        assert_eq!(&*rx.recv(None).unwrap(), b"last");
        assert_eq!(
            rx.recv(None).unwrap_err(),
            RecvError::Ring(RingError::Closed)
        );
        t.join().unwrap();
    });
}

/// Empty ring: a consumer polling concurrently with the first publish
/// either sees nothing or the whole record.
#[test]
fn loom_empty_then_one() {
    loom::model(|| {
        let (mut tx, mut rx) = pair(64).unwrap();
        let t = loom::thread::spawn(move || {
            tx.try_send(&[9; 12]).unwrap();
            tx
        });
        if let Some(m) = rx.try_recv().unwrap() {
            assert_eq!(&*m, &[9; 12]);
        }
        let _tx = t.join().unwrap();
    });
}
