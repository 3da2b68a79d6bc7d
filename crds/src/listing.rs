//! What a watch has listed since its latest list began, for the scaler and the
//! activator alike.
//!
//! A watch lists again after it lost its place (a restart of the API server, a
//! `410 Gone` once its resource version is compacted away), and what was deleted while
//! it was away sends no event: whatever the new list leaves out is gone. kube-runtime's
//! watcher marks a list with `Init`, one `InitApply` per object and `InitDone`.

use std::{collections::HashSet, hash::Hash};

#[derive(Debug)]
pub struct Listing<K> {
    /// `None` between lists.
    seen: Option<HashSet<K>>,
}

impl<K: Hash + Eq> Default for Listing<K> {
    /// A watch starts by listing.
    fn default() -> Self {
        Self {
            seen: Some(HashSet::new()),
        }
    }
}

impl<K: Hash + Eq> Listing<K> {
    /// A list begins (`Init`).
    pub fn begin(&mut self) {
        self.seen = Some(HashSet::new());
    }

    /// The list holds `key` (`InitApply`).
    pub fn saw(&mut self, key: K) {
        if let Some(seen) = &mut self.seen {
            seen.insert(key);
        }
    }

    /// A list is under way: deletions can wait for its end.
    pub fn is_listing(&self) -> bool {
        self.seen.is_some()
    }

    /// The list ended (`InitDone`): what it held.
    pub fn end(&mut self) -> HashSet<K> {
        self.seen.take().unwrap_or_default()
    }

    /// The list ended: which of `known` it left out, that is, which are gone.
    pub fn end_and_find_gone<'a>(&mut self, known: impl IntoIterator<Item = &'a K>) -> Vec<K>
    where
        K: Clone + 'a,
    {
        let listed = self.end();
        known
            .into_iter()
            .filter(|key| !listed.contains(*key))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_list_leaves_out_is_gone() {
        let mut listing = Listing::default();
        assert!(listing.is_listing(), "a watch starts by listing");
        listing.saw("a");
        listing.saw("b");
        assert_eq!(listing.end_and_find_gone(&["a", "b"]), Vec::<&str>::new());
        assert!(!listing.is_listing());
        // Between lists nothing is recorded.
        listing.saw("c");
        listing.begin();
        listing.saw("b");
        let mut gone = listing.end_and_find_gone(&["a", "b", "c"]);
        gone.sort_unstable();
        assert_eq!(gone, ["a", "c"]);
        // A list that ends without having begun (never, from kube-runtime) lists nothing.
        assert_eq!(listing.end_and_find_gone(&["a"]), ["a"]);
    }
}
