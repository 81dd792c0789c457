//! CPU time and resident memory of a proxy's whole process tree, read from /proc. A proxy with
//! worker processes (ours, nginx) must be counted with every worker, so the tree is the root and
//! all its descendants, found by parent pid (the kernel's `task/*/children` files are not always
//! built in). CPU time is the sum of every live thread's `schedstat` run time (nanoseconds, finer
//! than the 10 ms ticks of `stat`).

use std::fs;

/// A process and its descendants, as found when the tree was built.
#[derive(Debug, Clone)]
pub struct Tree {
    root: u32,
    pids: Vec<u32>,
}

/// One reading of a tree.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// CPU time of every live thread of every process, in nanoseconds.
    pub cpu_ns: u64,
    /// Sum of the processes' VmRSS.
    pub rss_kib: u64,
}

impl Tree {
    /// Finds `root` and every descendant now alive.
    pub fn of(root: u32) -> Tree {
        let parents: Vec<(u32, u32)> = fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter_map(|pid| Some((pid, parent_of(pid)?)))
            .collect();
        let mut pids = vec![root];
        let mut i = 0;
        while i < pids.len() {
            let p = pids[i];
            pids.extend(
                parents
                    .iter()
                    .filter(|(_, ppid)| *ppid == p)
                    .map(|(c, _)| *c),
            );
            i += 1;
        }
        pids.sort_unstable();
        Tree { root, pids }
    }

    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    pub fn sample(&self) -> Sample {
        let mut s = Sample::default();
        for &pid in &self.pids {
            s.cpu_ns += cpu_ns(pid);
            s.rss_kib += rss_kib(pid);
        }
        s
    }
}

/// A tree to watch during a load, or none when no pid was given.
pub fn watch(pid: Option<u32>) -> Option<Tree> {
    pid.map(Tree::of)
}

/// CPU nanoseconds the tree used between two samples, and a warning when its processes changed
/// (a worker died and was replaced: the figure would then be wrong).
pub fn cpu_between(tree: &Option<Tree>, before: Option<Sample>) -> (Option<u64>, Option<String>) {
    let (Some(tree), Some(before)) = (tree, before) else {
        return (None, None);
    };
    let after = tree.sample();
    let now = Tree::of(tree.root);
    let warning = (now.pids != tree.pids).then(|| {
        format!(
            "the proxy's processes changed during the load ({:?} -> {:?})",
            tree.pids, now.pids
        )
    });
    (Some(after.cpu_ns.saturating_sub(before.cpu_ns)), warning)
}

/// Field 4 of /proc/PID/stat; the command name (field 2) may hold spaces, so parse after its ')'.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_tree_has_cpu_and_memory() {
        let t = Tree::of(std::process::id());
        assert!(t.pids().contains(&std::process::id()));
        let s = t.sample();
        assert!(s.cpu_ns > 0);
        assert!(s.rss_kib > 0);
    }
}
