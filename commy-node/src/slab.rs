//! A table of values indexed by small reusable numbers (handles that JS
//! holds as plain integers).

/// Values by index; freed indexes are reused.
pub(crate) struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    /// Stores `value`; returns its index.
    pub(crate) fn insert(&mut self, value: T) -> u32 {
        if let Some(i) = self.free.pop() {
            self.items[i as usize] = Some(value);
            i
        } else {
            self.items.push(Some(value));
            // Indexes stay far below u32::MAX: each is a live handle.
            u32::try_from(self.items.len() - 1).unwrap_or(u32::MAX)
        }
    }

    /// Removes and returns the value at `index`, if there is one.
    pub(crate) fn remove(&mut self, index: u32) -> Option<T> {
        let value = self.items.get_mut(index as usize)?.take()?;
        self.free.push(index);
        Some(value)
    }

    /// Removes every value.
    pub(crate) fn drain(&mut self) -> Vec<T> {
        self.free.clear();
        self.items.drain(..).flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_are_reused_and_stale_ones_are_empty() {
        let mut s = Slab::default();
        let a = s.insert("a");
        s.insert("b");
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None);
        assert_eq!(s.insert("c"), a);
        assert_eq!(s.remove(99), None);
        let mut all = s.drain();
        all.sort_unstable();
        assert_eq!(all, ["b", "c"]);
    }
}
