//! The listening sockets of one protocol side of a worker, by slab key and by address, and the
//! one reconciliation with a new rule set that TCP and UDP share: new addresses are opened,
//! removed ones closed, kept ones serve new connections with their new pool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;

use slab::Slab;

use crate::balance::ServedPool;

/// One listening socket and the pool it serves.
pub struct Bound<S> {
    pub socket: S,
    /// The pool as of the last apply; connections already accepted keep their own copy.
    pub pool: Rc<ServedPool>,
}

/// A side's listening sockets.
pub struct Listeners<S> {
    slab: Slab<Bound<S>>,
    /// Which key listens on an address (one socket per address and protocol).
    by_addr: HashMap<SocketAddr, usize>,
}

impl<S> Default for Listeners<S> {
    fn default() -> Self {
        Listeners {
            slab: Slab::new(),
            by_addr: HashMap::new(),
        }
    }
}

impl<S> std::ops::Index<usize> for Listeners<S> {
    type Output = Bound<S>;

    fn index(&self, key: usize) -> &Bound<S> {
        &self.slab[key]
    }
}

impl<S> Listeners<S> {
    pub fn get(&self, key: usize) -> Option<&Bound<S>> {
        self.slab.get(key)
    }

    pub fn get_mut(&mut self, key: usize) -> Option<&mut Bound<S>> {
        self.slab.get_mut(key)
    }

    pub fn keys(&self) -> Vec<usize> {
        self.slab.iter().map(|(k, _)| k).collect()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Bound<S>> {
        self.slab.iter_mut().map(|(_, b)| b)
    }

    /// Takes every socket out (draining: the caller closes them).
    pub fn take_all(&mut self) -> Vec<Bound<S>> {
        self.by_addr.clear();
        std::mem::take(&mut self.slab)
            .into_iter()
            .map(|(_, b)| b)
            .collect()
    }

    /// Makes the sockets match `wanted`. A removed address's socket goes to `closed` with its key;
    /// a new address is opened by `open` (given the key it will have, for its token) unless
    /// `open_new` is false (draining). Returns the keys opened and the errors of those that
    /// could not be, as `open` worded them.
    pub fn reconcile(
        &mut self,
        wanted: Vec<ServedPool>,
        open_new: bool,
        mut open: impl FnMut(SocketAddr, usize) -> Result<S, String>,
        mut closed: impl FnMut(usize, Bound<S>),
    ) -> (Vec<usize>, Vec<String>) {
        let wanted: HashMap<SocketAddr, ServedPool> =
            wanted.into_iter().map(|p| (p.spec.listen, p)).collect();
        let gone: Vec<SocketAddr> = self
            .by_addr
            .keys()
            .filter(|a| !wanted.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            if let Some(key) = self.by_addr.remove(&addr) {
                let bound = self.slab.remove(key);
                closed(key, bound);
            }
        }
        let mut opened = Vec::new();
        let mut errors = Vec::new();
        for (addr, pool) in wanted {
            let pool = Rc::new(pool);
            if let Some(&key) = self.by_addr.get(&addr) {
                self.slab[key].pool = pool;
                continue;
            }
            if !open_new {
                continue;
            }
            let key = self.slab.vacant_key();
            match open(addr, key) {
                Ok(socket) => {
                    self.slab.insert(Bound { socket, pool });
                    self.by_addr.insert(addr, key);
                    opened.push(key);
                }
                Err(e) => errors.push(e),
            }
        }
        (opened, errors)
    }
}
