//! Samples waiting to be sent: bounded, oldest dropped first, sent in order.

use std::collections::VecDeque;

/// How many samples are kept while the control plane does not answer (a minute at 500 ms).
pub const CAPACITY: usize = 120;

#[derive(Debug)]
pub struct Backlog<T> {
    items: VecDeque<T>,
    capacity: usize,
    dropped: u64,
}

impl<T> Backlog<T> {
    pub fn new(capacity: usize) -> Backlog<T> {
        assert!(capacity > 0);
        Backlog { items: VecDeque::with_capacity(capacity), capacity, dropped: 0 }
    }

    /// Adds the newest sample; when full, the oldest one goes.
    pub fn push(&mut self, item: T) {
        if self.items.len() == self.capacity {
            self.items.pop_front();
            self.dropped += 1;
        }
        self.items.push_back(item);
    }

    /// The oldest sample, the next to send.
    pub fn front(&self) -> Option<&T> {
        self.items.front()
    }

    /// Removes the oldest sample once it was sent.
    pub fn pop(&mut self) -> Option<T> {
        self.items.pop_front()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Samples lost to the bound since the start.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_the_newest_when_full() {
        let mut b = Backlog::new(3);
        for i in 1..=5 {
            b.push(i);
        }
        assert_eq!(b.len(), 3);
        assert_eq!(b.dropped(), 2);
        let drained: Vec<_> = std::iter::from_fn(|| b.pop()).collect();
        assert_eq!(drained, [3, 4, 5]);
        assert!(b.is_empty());
    }

    #[test]
    fn front_is_the_oldest_until_popped() {
        let mut b = Backlog::new(CAPACITY);
        b.push("a");
        b.push("b");
        assert_eq!(b.front(), Some(&"a"));
        assert_eq!(b.pop(), Some("a"));
        assert_eq!(b.front(), Some(&"b"));
        assert_eq!(b.dropped(), 0);
    }
}
