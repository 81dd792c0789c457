//! `ssl-echo-client`: a load client for TLS (or plain TCP) echo servers. It opens N connections
//! (spread over several processes when one process's open-file limit is too small), holds them
//! at a barrier, then exchanges messages and checks every echo, and reports response times in a
//! table, as JSON and as a spreadsheet.
//!
//! One hop from `main`: [`args`] (command line) → [`coordinator`] (processes and the barrier) →
//! [`shard`] (one process's connections) → [`session`] (one connection) → [`summary`] and
//! [`report`]. TLS settings and what each handshake negotiated: [`tls`]; handshake capacity
//! (`--churn`): [`churn`]; the agent's control port limits: [`gate`].

pub mod agent;
pub mod args;
pub mod backends;
pub mod churn;
pub mod config;
pub mod connector;
pub mod coordinator;
pub mod csv;
pub mod failure;
pub mod fairness;
pub mod gate;
pub mod interval;
pub mod link;
pub mod live;
pub mod meter;
pub mod prompt;
pub mod ramp;
pub mod recorder;
pub mod report;
pub mod session;
pub mod shard;
pub mod slo;
pub mod summary;
pub mod tls;
pub mod worker;
