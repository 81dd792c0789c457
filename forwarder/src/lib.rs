//! The forwarder: a mio (epoll) TCP and UDP port forwarder and round-robin load balancer. A supervisor
//! process owns the rules and the worker processes; each worker runs one event loop with its own
//! `SO_REUSEPORT` listeners; counters and health live in a mapping they all share.

pub mod access_log;
pub mod balance;
pub mod capacity;
pub mod control;
pub mod dns;
pub mod listeners;
pub mod outbound;
pub mod ranges;
pub mod rate;
pub mod rules;
pub mod service;
pub mod stats;
pub mod steer;
pub mod supervisor;
pub mod tcp;
pub mod tokens;
pub mod udp;
pub mod web;
pub mod worker;
