//! The UDP session table of one worker, without sockets: which client address (on which
//! listening port) has a session, when each was last active, idle expiry, and eviction of the
//! oldest idle session when the table is full. Keys are stable slab keys (the worker uses them in
//! event tokens); time is milliseconds given by the caller, so tests drive it without waiting.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;

use slab::Slab;

/// A session's place in the age order moves at most this often: activity inside one granule does
/// not touch the ordered set, so a busy session costs one map lookup per datagram, not a
/// re-insert. Expiry and eviction are exact anyway (they check the true last activity).
pub const ORDER_GRANULE_MS: u64 = 250;

struct Slot<V> {
    port: usize,
    client: SocketAddr,
    last_ms: u64,
    /// Order of the last activity among all sessions (breaks ties within one millisecond).
    last_seq: u64,
    /// The time under which the slot sits in `order` (at most one granule behind `last_ms`).
    ordered_ms: u64,
    value: V,
}

/// Sessions keyed by (listening port key, client address).
pub struct SessionTable<V> {
    slots: Slab<Slot<V>>,
    by_client: HashMap<(usize, SocketAddr), usize>,
    /// (ordered_ms, key), oldest first.
    order: BTreeSet<(u64, usize)>,
    capacity: usize,
    /// An eviction episode is running: the table has been full since the last eviction.
    evicting: bool,
    /// Counts activity, for `last_seq`.
    seq: u64,
}

/// A session taken out of the table to make room for a new one.
pub struct Evicted<V> {
    pub port: usize,
    pub client: SocketAddr,
    pub value: V,
    /// True for the first eviction since the table last had room (log once per episode).
    pub first_of_episode: bool,
}

impl<V> SessionTable<V> {
    pub fn new(capacity: usize) -> SessionTable<V> {
        SessionTable {
            slots: Slab::new(),
            by_client: HashMap::new(),
            order: BTreeSet::new(),
            capacity: capacity.max(1),
            evicting: false,
            seq: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The key the next [`insert`](Self::insert) will return (for a token made before it).
    pub fn vacant_key(&self) -> usize {
        self.slots.vacant_key()
    }

    /// The session of `client` on `port`, if any.
    pub fn find(&self, port: usize, client: SocketAddr) -> Option<usize> {
        self.by_client.get(&(port, client)).copied()
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut V> {
        self.slots.get_mut(key).map(|s| &mut s.value)
    }

    pub fn get(&self, key: usize) -> Option<&V> {
        self.slots.get(key).map(|s| &s.value)
    }

    /// The listening port key and client address of session `key`.
    pub fn client(&self, key: usize) -> Option<(usize, SocketAddr)> {
        self.slots.get(key).map(|s| (s.port, s.client))
    }

    /// Records activity on session `key` at `now_ms`.
    pub fn touch(&mut self, key: usize, now_ms: u64) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        self.seq += 1;
        slot.last_seq = self.seq;
        slot.last_ms = slot.last_ms.max(now_ms);
        if slot.last_ms >= slot.ordered_ms + ORDER_GRANULE_MS {
            self.order.remove(&(slot.ordered_ms, key));
            slot.ordered_ms = slot.last_ms;
            self.order.insert((slot.ordered_ms, key));
        }
    }

    /// When the table is full, takes out the least recently active session so one more fits.
    pub fn make_room(&mut self) -> Option<Evicted<V>> {
        if self.slots.len() < self.capacity {
            self.evicting = false;
            return None;
        }
        let oldest = self.oldest()?;
        let first_of_episode = !self.evicting;
        self.evicting = true;
        let (port, client, value) = self.remove(oldest)?;
        Some(Evicted {
            port,
            client,
            value,
            first_of_episode,
        })
    }

    /// Adds a session; call [`make_room`](Self::make_room) first (the table grows past its
    /// capacity otherwise). Returns its key.
    pub fn insert(&mut self, port: usize, client: SocketAddr, now_ms: u64, value: V) -> usize {
        self.seq += 1;
        let key = self.slots.insert(Slot {
            port,
            client,
            last_ms: now_ms,
            last_seq: self.seq,
            ordered_ms: now_ms,
            value,
        });
        self.by_client.insert((port, client), key);
        self.order.insert((now_ms, key));
        key
    }

    pub fn remove(&mut self, key: usize) -> Option<(usize, SocketAddr, V)> {
        let slot = self.slots.try_remove(key)?;
        self.by_client.remove(&(slot.port, slot.client));
        self.order.remove(&(slot.ordered_ms, key));
        Some((slot.port, slot.client, slot.value))
    }

    /// Takes out every session idle for `idle_ms` or longer at `now_ms`.
    pub fn expire(&mut self, now_ms: u64, idle_ms: u64) -> Vec<(usize, SocketAddr, V)> {
        let mut gone = Vec::new();
        while let Some(&(ordered_ms, key)) = self.order.first() {
            if ordered_ms + idle_ms > now_ms {
                break;
            }
            let last_ms = self.slots[key].last_ms;
            if last_ms + idle_ms > now_ms {
                // Active within the granule: put it back where it belongs.
                self.order.remove(&(ordered_ms, key));
                self.slots[key].ordered_ms = last_ms;
                self.order.insert((last_ms, key));
                continue;
            }
            gone.extend(self.remove(key));
        }
        gone
    }

    /// Takes out every session of listening port `port` (the port is gone).
    pub fn remove_port(&mut self, port: usize) -> Vec<(usize, SocketAddr, V)> {
        let keys: Vec<usize> = self
            .slots
            .iter()
            .filter(|(_, s)| s.port == port)
            .map(|(k, _)| k)
            .collect();
        keys.into_iter().filter_map(|k| self.remove(k)).collect()
    }

    /// Every session: key, port, client, milliseconds since last activity, value.
    pub fn iter(&self, now_ms: u64) -> impl Iterator<Item = (usize, usize, SocketAddr, u64, &V)> {
        self.slots.iter().map(move |(k, s)| {
            (
                k,
                s.port,
                s.client,
                now_ms.saturating_sub(s.last_ms),
                &s.value,
            )
        })
    }

    /// The least recently active session, exactly (the ordered set is at most one granule off,
    /// so the candidates are the sessions ordered within one granule of the first).
    fn oldest(&self) -> Option<usize> {
        let &(first_ms, _) = self.order.first()?;
        self.order
            .range(..(first_ms + ORDER_GRANULE_MS, 0))
            .map(|&(_, k)| k)
            .min_by_key(|&k| (self.slots[k].last_ms, self.slots[k].last_seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn one_session_per_client_and_port() {
        let mut t = SessionTable::new(10);
        let a = t.insert(0, addr(1), 0, "a");
        let b = t.insert(1, addr(1), 0, "b");
        assert_ne!(a, b, "same client on another port is another session");
        assert_eq!(t.find(0, addr(1)), Some(a));
        assert_eq!(t.find(1, addr(1)), Some(b));
        assert_eq!(t.find(0, addr(2)), None);
        assert_eq!(t.remove(a).map(|r| r.2), Some("a"));
        assert_eq!(t.find(0, addr(1)), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn idle_sessions_expire_and_active_ones_stay() {
        let mut t = SessionTable::new(10);
        let quiet = t.insert(0, addr(1), 0, "quiet");
        let busy = t.insert(0, addr(2), 0, "busy");
        for ms in (0..=59_900).step_by(100) {
            t.touch(busy, ms);
        }
        assert!(
            t.expire(59_999, 60_000).is_empty(),
            "nothing is 60 s idle yet"
        );
        let gone = t.expire(60_000, 60_000);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].2, "quiet");
        assert_eq!(t.find(0, addr(1)), None);
        assert_eq!(t.find(0, addr(2)), Some(busy));
        // Touched at 59,900 (inside the last granule): expires exactly 60 s after that.
        assert!(t.expire(119_899, 60_000).is_empty());
        assert_eq!(t.expire(119_900, 60_000).len(), 1);
        assert!(t.is_empty());
        let _ = quiet;
    }

    #[test]
    fn full_table_evicts_the_least_recently_active_once_per_episode() {
        let mut t = SessionTable::new(3);
        let keys: Vec<usize> = (0..3).map(|i| t.insert(0, addr(i), 0, i)).collect();
        // Session 0 is the oldest but speaks last, inside the first granule: 1 is least recent.
        t.touch(keys[1], 10);
        t.touch(keys[2], 20);
        t.touch(keys[0], 30);
        let e = t.make_room().expect("full table evicts");
        assert_eq!((e.client, e.value, e.first_of_episode), (addr(1), 1, true));
        t.insert(0, addr(10), 40, 10);
        let e = t.make_room().expect("still full");
        assert_eq!((e.client, e.value, e.first_of_episode), (addr(2), 2, false));
        t.insert(0, addr(11), 50, 11);
        assert_eq!(t.len(), 3);
        // Room again (one expired): the episode ends, the next eviction is logged again.
        t.remove(t.find(0, addr(0)).unwrap());
        assert!(t.make_room().is_none());
        t.insert(0, addr(12), 60, 12);
        assert!(t.make_room().unwrap().first_of_episode);
    }

    #[test]
    fn activity_within_one_millisecond_still_orders_eviction() {
        let mut t = SessionTable::new(3);
        let keys: Vec<usize> = (0..3).map(|i| t.insert(0, addr(i), 5, i)).collect();
        t.touch(keys[0], 5);
        assert_eq!(t.make_room().unwrap().client, addr(1));
    }

    #[test]
    fn removing_a_port_ends_only_its_sessions() {
        let mut t = SessionTable::new(10);
        t.insert(0, addr(1), 0, 'a');
        t.insert(1, addr(1), 0, 'b');
        t.insert(0, addr(2), 0, 'c');
        let mut gone: Vec<char> = t.remove_port(0).into_iter().map(|r| r.2).collect();
        gone.sort();
        assert_eq!(gone, ['a', 'c']);
        assert_eq!(t.len(), 1);
        assert!(t.find(1, addr(1)).is_some());
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_new_clients() {
        let mut t = SessionTable::new(100);
        for i in 0..10_000u16 {
            let _ = t.make_room();
            t.insert(0, addr(i), u64::from(i), i);
        }
        assert_eq!(t.len(), 100);
        assert_eq!(t.by_client.len(), 100);
        assert_eq!(t.order.len(), 100);
        assert!(t.find(0, addr(9_999)).is_some());
        assert!(t.find(0, addr(9_899)).is_none());
    }
}
