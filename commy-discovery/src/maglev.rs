//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table
//! that maps a key's hash to one of the endpoints, built so that each
//! endpoint owns an almost equal share of the slots and removing one
//! endpoint moves little more than the keys it owned.
//!
//! The table is built when the endpoints change (it allocates its slots
//! then); a lookup is one hash of the key and one read, with no
//! allocation and no lock. The hashes are FNV-1a with a 64-bit finalizer,
//! fixed by this module: the same key goes to the same endpoint in every
//! process and every SDK, which all look up through here.
//!
//! ```
//! use commy_discovery::Maglev;
//!
//! let table = Maglev::new(&["a:1", "b:1", "c:1"]);
//! let i = table.pick(b"user-42").unwrap();
//! // The same key always lands on the same endpoint.
//! assert_eq!(table.pick(b"user-42"), Some(i));
//! assert!(Maglev::new::<&str>(&[]).pick(b"user-42").is_none());
//! ```

/// Slots of a table: a prime, as the algorithm needs.
pub const MAGLEV_TABLE_SIZE: usize = 65_537;

/// A Maglev lookup table over a list of endpoints, by their names.
#[derive(Debug, Clone)]
pub struct Maglev {
    /// The endpoint (its index in the list it was built from) owning each
    /// slot; empty when there are no endpoints.
    slots: Vec<u32>,
}

impl Maglev {
    /// Builds the table of `names` (the endpoints, each named by something
    /// stable: an address, an instance id). Equal names are the same
    /// endpoint twice: give each a distinct name.
    pub fn new<N: AsRef<[u8]>>(names: &[N]) -> Maglev {
        Maglev::with_size(names, MAGLEV_TABLE_SIZE)
    }

    /// [`Maglev::new`] with a table of `size` slots (a prime above the
    /// number of endpoints; tests use small ones).
    fn with_size<N: AsRef<[u8]>>(names: &[N], size: usize) -> Maglev {
        let n = names.len();
        if n == 0 {
            return Maglev { slots: Vec::new() };
        }
        let m = size as u64;
        // Each endpoint walks its own permutation of the slots:
        // offset + j * skip (mod m), skip never 0, m prime.
        let walks: Vec<(u64, u64)> = names
            .iter()
            .map(|name| {
                let name = name.as_ref();
                let offset = hash(name, SEED_OFFSET) % m;
                let skip = hash(name, SEED_SKIP) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; n];
        let mut slots = vec![u32::MAX; size];
        let mut filled = 0;
        'fill: loop {
            for (i, &(offset, skip)) in walks.iter().enumerate() {
                // The endpoint's next slot not taken yet.
                let mut c = (offset + next[i] * skip) % m;
                while slots[c as usize] != u32::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                slots[c as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
        Maglev { slots }
    }

    /// The endpoint (its index in the list the table was built from) that
    /// `key` goes to; `None` when there are no endpoints.
    pub fn pick(&self, key: &[u8]) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let slot = hash(key, SEED_KEY) % self.slots.len() as u64;
        Some(self.slots[slot as usize] as usize)
    }
}

/// Seeds of the three hashes: the permutation's offset and skip, and keys.
const SEED_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const SEED_SKIP: u64 = 0x8422_2325_cbf2_9ce4;
const SEED_KEY: u64 = 0x9e37_79b9_7f4a_7c15;

/// FNV-1a from `seed`, then the splitmix64 finalizer: FNV alone leaves
/// the low bits of short inputs poorly mixed.
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:7000")).collect()
    }

    fn keys() -> impl Iterator<Item = Vec<u8>> {
        (0..100_000u32).map(|k| format!("key-{k}").into_bytes())
    }

    #[test]
    fn every_endpoint_owns_about_an_equal_share() {
        let table = Maglev::new(&names(10));
        let mut owned = [0usize; 10];
        for &s in &table.slots {
            owned[s as usize] += 1;
        }
        let fair = MAGLEV_TABLE_SIZE / 10;
        for (i, n) in owned.iter().enumerate() {
            assert!(
                n.abs_diff(fair) <= fair / 100,
                "endpoint {i} owns {n} slots"
            );
        }
    }

    #[test]
    fn removing_one_of_ten_endpoints_moves_little_more_than_its_keys() {
        let all = names(10);
        let before = Maglev::new(&all);
        // The 4th endpoint goes: the rest keep their names, not their
        // indices.
        let rest: Vec<&String> = all.iter().filter(|n| *n != &all[3]).collect();
        let after = Maglev::new(&rest);
        let mut moved = 0;
        for key in keys() {
            let was = &all[before.pick(&key).unwrap()];
            let now = rest[after.pick(&key).unwrap()];
            if was != now {
                moved += 1;
            }
        }
        // About a tenth had to move (the removed endpoint's); the issue
        // allows 12 %.
        assert!(moved <= 12_000, "{moved} of 100000 keys moved");
        assert!(
            moved >= 9_000,
            "{moved}: the removed endpoint's keys must move"
        );
    }

    #[test]
    fn the_same_names_make_the_same_table_and_keys_spread() {
        let a = Maglev::new(&names(3));
        let b = Maglev::new(&names(3));
        assert_eq!(a.slots, b.slots);
        let mut seen = [0usize; 3];
        for key in keys() {
            seen[a.pick(&key).unwrap()] += 1;
        }
        for n in seen {
            assert!((30_000..37_000).contains(&n), "{seen:?}");
        }
    }

    #[test]
    fn a_small_table_is_filled_whole_and_one_endpoint_owns_it_all() {
        let t = Maglev::with_size(&names(4), 13);
        assert!(t.slots.iter().all(|&s| s < 4));
        let one = Maglev::new(&["only"]);
        assert!(one.slots.iter().all(|&s| s == 0));
        assert_eq!(one.pick(b""), Some(0));
    }
}
