//! The relaying phase of a connection in user space: which directions an event wakes, and one
//! pass over both ([`Direction::pump`] moves the bytes, by buffer or by splice), counting what
//! moved, passing FINs on, and yielding when a direction took its fair share.

use std::sync::atomic::Ordering::Relaxed;

use std::os::fd::AsRawFd;

use crate::rate::throttle::{self, Throttle, Way};
use crate::tcp::direction::Progress;
use crate::tcp::relay::{Context, Ending, Next, Phase, Relay, Side, Sides, Wake};

#[cfg(doc)]
use crate::tcp::direction::Direction;

impl Relay {
    /// A socket's readability drives the direction it is the source of, its writability the
    /// direction it is the sink of; errors and hang-ups wake both. This saves a read that would
    /// only return EAGAIN on every event.
    pub(super) fn sides_for(&mut self, side: Side, wake: Wake) -> Sides {
        match (side, wake) {
            (Side::Client, Wake::Error) => {
                self.up.source_closing();
                Sides::BOTH
            }
            (Side::Backend, Wake::Error) => {
                self.down.source_closing();
                Sides::BOTH
            }
            // Room in a sink matters only to a direction holding bytes for it; a writable edge
            // after every ACK would otherwise cost a read that returns EAGAIN.
            (Side::Client, Wake::Io { readable, writable }) => Sides {
                up: readable,
                down: writable && self.down.holds_bytes(),
                until_eagain: false,
            },
            (Side::Backend, Wake::Io { readable, writable }) => Sides {
                up: writable && self.up.holds_bytes(),
                down: readable,
                until_eagain: false,
            },
        }
    }

    pub(super) fn pump(&mut self, sides: Sides, ctx: &mut Context) -> Next {
        let Phase::Relaying { backend } = &mut self.phase else {
            return Next::Wait;
        };
        let mut up = Progress::default();
        let mut down = Progress::default();
        let mut result = Ok(());
        if self.throttle.is_none() && Throttle::pool_limited(ctx.shared, self.pool.spec.slot) {
            let rtt = throttle::socket_rtt_ns(self.client.as_raw_fd())
                .max(throttle::socket_rtt_ns(backend.as_raw_fd()));
            self.throttle = Some(Box::new(Throttle::new(
                self.pool.spec.slot,
                self.client_addr.ip(),
                rtt,
            )));
        }
        let now_ns = if self.throttle.is_some() {
            crate::rate::now_ns()
        } else {
            0
        };
        let budget = |t: &mut Option<Box<Throttle>>, way: Way| match t {
            Some(t) => t.allowance(ctx.shared, way, now_ns),
            None => u64::MAX,
        };
        if sides.up {
            let other = self.down.finished();
            let budget = budget(&mut self.throttle, Way::Up);
            result = self
                .up
                .pump(
                    &mut self.client,
                    backend,
                    ctx.res,
                    sides.until_eagain,
                    other,
                    budget,
                )
                .map(|p| up = p);
        }
        if sides.down && result.is_ok() {
            let other = self.up.finished();
            let budget = budget(&mut self.throttle, Way::Down);
            result = self
                .down
                .pump(
                    backend,
                    &mut self.client,
                    ctx.res,
                    sides.until_eagain,
                    other,
                    budget,
                )
                .map(|p| down = p);
        }
        if let Some(t) = self.throttle.as_mut() {
            if sides.up {
                t.charge(ctx.shared, Way::Up, now_ns, up.read, up.throttled);
            }
            if sides.down {
                t.charge(ctx.shared, Way::Down, now_ns, down.read, down.throttled);
            }
        }
        if self.first_fin.is_none() {
            if self.up.source_done() {
                self.first_fin = Some(Side::Client);
            } else if self.down.source_done() {
                self.first_fin = Some(Side::Backend);
            }
        }
        if self.header_sent_uncounted > 0 {
            // The PROXY header is not the client's traffic.
            let header = up.moved.min(self.header_sent_uncounted);
            up.moved -= header;
            self.header_sent_uncounted -= header;
        }
        let slot = ctx.shared.backend(self.backend_slot());
        if up.moved > 0 {
            slot.bytes_up.fetch_add(up.moved, Relaxed);
            if up.spliced > 0 {
                slot.spliced_up.fetch_add(up.spliced, Relaxed);
            }
        }
        if down.moved > 0 {
            slot.bytes_down.fetch_add(down.moved, Relaxed);
            if down.spliced > 0 {
                slot.spliced_down.fetch_add(down.spliced, Relaxed);
            }
        }
        if let Err(e) = result {
            return Next::Close(Ending::Failed(e));
        }
        if self.up.finished() && self.down.finished() {
            Next::Close(Ending::Finished)
        } else if up.yielded || down.yielded {
            Next::Again(Sides {
                up: up.yielded,
                down: down.yielded,
                until_eagain: true,
            })
        } else if let Some(at) = self
            .throttle
            .as_mut()
            .and_then(|t| t.timer(ctx.now, now_ns))
        {
            Next::Timer(at)
        } else {
            Next::Wait
        }
    }

    /// A bandwidth wake-up: pump the held directions that may read again (to EAGAIN: their
    /// sockets raised no edge while held), or arm the next wake-up.
    pub(super) fn throttle_expired(&mut self, ctx: &mut Context) -> Next {
        let now = crate::rate::now_ns();
        let Some(t) = self.throttle.as_mut() else {
            return Next::Wait;
        };
        t.fired();
        let sides = Sides {
            up: t.due(Way::Up, now),
            down: t.due(Way::Down, now),
            until_eagain: true,
        };
        if sides.up || sides.down {
            return self.pump(sides, ctx);
        }
        match t.timer(ctx.now, now) {
            Some(at) => Next::Timer(at),
            None => Next::Wait,
        }
    }
}
