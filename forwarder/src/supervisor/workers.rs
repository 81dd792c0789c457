//! The worker processes: starting one (its configuration frame, then the rules in force),
//! restarting one that died, sending requests and waiting for the numbered reply, delivering a
//! rule set to all, and stopping them at shutdown.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::Child;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::Supervisor;
use crate::control::{self, FrameReader, Numbered, PoolSpec, Reply, Request};
use crate::worker::WorkerConfig;

/// One worker process and its end of the control socket.
pub(super) struct WorkerHandle {
    pub(super) index: usize,
    pub(super) child: Child,
    pub(super) control: UnixStream,
    pub(super) replies: FrameReader,
    /// Sequence number of the last request sent.
    pub(super) asked: u64,
    pub(super) started: Instant,
}

impl Supervisor {
    pub(super) fn spawn_worker(
        &self,
        index: usize,
        specs: &[PoolSpec],
    ) -> anyhow::Result<WorkerHandle> {
        let (ours, theirs) = UnixStream::pair().context("creating control socket pair")?;
        let stats_fd = self.shared.raw_fd();
        let control_fd = theirs.as_raw_fd();
        let mut cmd = testbed::workers::worker_command(&[stats_fd, control_fd])
            .context("finding own executable")?;
        // The index is there for `ps` only; the worker's settings come in the frame below.
        cmd.arg("--worker-index")
            .arg(index.to_string())
            .arg("--worker-fds")
            .arg(format!("{stats_fd},{control_fd}"));
        let child = cmd.spawn().context("starting a worker process")?;
        drop(theirs);
        ours.set_read_timeout(Some(Duration::from_secs(5)))?;
        // The worker's settings go first: it reads nothing else until it has them.
        let config = WorkerConfig {
            index,
            ..self.config.worker.clone()
        };
        let mut frame = Vec::new();
        control::encode(&config, &mut frame)?;
        (&ours)
            .write_all(&frame)
            .context("sending the worker its configuration")?;
        let mut worker = WorkerHandle {
            index,
            child,
            control: ours,
            replies: FrameReader::default(),
            asked: 0,
            started: Instant::now(),
        };
        match worker.ask(&Request::Apply {
            pools: specs.to_vec(),
        }) {
            Ok(Reply::Applied { errors }) => {
                for e in errors {
                    tracing::error!(worker = index, "{e}");
                }
            }
            Ok(_) => tracing::error!(worker = index, "unexpected reply to apply"),
            Err(e) => tracing::error!(worker = index, "worker did not take its rules: {e:#}"),
        }
        tracing::debug!(worker = index, pid = worker.child.id(), "worker started");
        Ok(worker)
    }

    pub(super) fn restart_dead_workers(&self) {
        if self.stopping.load(Relaxed) {
            return;
        }
        let mut inner = self.lock();
        let specs = inner.specs.clone();
        for i in 0..inner.workers.len() {
            let status = match inner.workers[i].child.try_wait() {
                Ok(Some(status)) => status,
                _ => continue,
            };
            let index = inner.workers[i].index;
            // Its connections died with it: off the open counts before its successor counts.
            let held = self.shared.forget_worker(index);
            let how = match status.signal() {
                Some(sig) => format!("killed by signal {sig}"),
                None => format!("exited ({status})"),
            };
            tracing::warn!(
                worker = index,
                "worker {index} {how} after {:.1} s holding {held} connections; restarting",
                inner.workers[i].started.elapsed().as_secs_f64()
            );
            match self.spawn_worker(index, &specs) {
                Ok(w) => inner.workers[i] = w,
                Err(e) => tracing::error!(worker = index, "cannot restart worker: {e:#}"),
            }
        }
    }

    pub(super) fn shutdown(&self) -> anyhow::Result<()> {
        crate::service::notify::stopping();
        if let Ok(steering) = &self.config.steering {
            // Connections already redirected keep their conntrack entries and go on.
            steering.remove();
        }
        let mut inner = self.lock();
        tracing::info!(
            "shutting down: draining connections for up to {} s",
            self.config.drain_timeout.as_secs()
        );
        for w in &inner.workers {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(w.child.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + self.config.drain_timeout + Duration::from_secs(2);
        for w in inner.workers.iter_mut() {
            loop {
                if let Ok(Some(_)) = w.child.try_wait() {
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::warn!(worker = w.index, "worker did not drain in time; killing it");
                    let _ = w.child.kill();
                    let _ = w.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Sends `specs` to every live worker; returns the workers that did not apply them and why. A
/// worker that has exited is not a failure: it is restarted with the rules in force.
pub(super) fn deliver(workers: &mut [WorkerHandle], specs: &[PoolSpec]) -> Vec<(usize, String)> {
    let mut failures = Vec::new();
    for w in workers.iter_mut() {
        let why = match w.ask(&Request::Apply {
            pools: specs.to_vec(),
        }) {
            Ok(Reply::Applied { errors }) if errors.is_empty() => continue,
            Ok(Reply::Applied { errors }) => errors.join("; "),
            Ok(other) => format!("unexpected reply {other:?}"),
            Err(_) if matches!(w.child.try_wait(), Ok(Some(_))) => continue,
            Err(e) => format!("{e:#}"),
        };
        tracing::error!(worker = w.index, "rules not applied: {why}");
        failures.push((w.index, why));
    }
    failures
}

impl WorkerHandle {
    /// Sends one request and waits (up to the socket's read timeout) for its reply.
    pub(super) fn ask(&mut self, request: &Request) -> anyhow::Result<Reply> {
        self.asked += 1;
        let mut frame = Vec::new();
        control::encode(&(self.asked, request), &mut frame)?;
        self.control
            .write_all(&frame)
            .context("sending to worker")?;
        let mut buf = [0u8; 64 * 1024];
        loop {
            while let Some(reply) = self.replies.next_frame::<Numbered<Reply>>() {
                let (seq, reply) = reply.context("decoding worker reply")?;
                if seq == self.asked {
                    return Ok(reply);
                }
                // The late answer to a request that timed out earlier.
            }
            let n = self
                .control
                .read(&mut buf)
                .context("reading worker reply")?;
            anyhow::ensure!(n > 0, "worker closed its control socket");
            self.replies.push(&buf[..n]);
        }
    }
}
