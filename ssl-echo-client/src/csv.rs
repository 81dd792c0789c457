//! The per-connection CSV written next to the spreadsheet (`report.xlsx` → `report.csv`): the
//! Connections sheet's rows for tools that do not read xlsx. Same columns and order
//! ([`crate::report::CONNECTION_COLUMNS`]), then the corrected times and failed sends.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::coordinator::Outcome;
use crate::report::{CONNECTION_COLUMNS, CORRECTED_COLUMNS};

/// `reports/run.xlsx` → `reports/run.csv`.
pub fn path_next_to(report: &Path) -> PathBuf {
    report.with_extension("csv")
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn ms3(v: f64) -> String {
    format!("{v:.3}")
}

/// Writes one row per connection, in id order.
pub fn write(path: &Path, outcome: &Outcome) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(path)
        .with_context(|| format!("writing the connections CSV {}", path.display()))?;
    let header: Vec<&str> = CONNECTION_COLUMNS
        .iter()
        .chain(CORRECTED_COLUMNS.iter())
        .copied()
        .collect();
    w.write_record(&header)?;
    let us = |v: Option<u64>| opt(v.map(|v| ms3(v as f64 / 1000.0)));
    for r in &outcome.records {
        w.write_record([
            r.id.to_string(),
            r.process.to_string(),
            opt(r.local_port),
            opt(r.connect_ms.map(ms3)),
            opt(r.handshake_ms.map(ms3)),
            r.messages.to_string(),
            r.bytes_sent.to_string(),
            r.bytes_received.to_string(),
            us(r.response_us_min),
            opt(r.response_ms_avg().map(ms3)),
            us(r.response_us_max),
            u32::from(r.failure.is_some()).to_string(),
            opt(r.failure.as_ref()),
            r.agent.clone().unwrap_or_else(|| "local".to_string()),
            opt(r.local_ip),
            r.backend.clone().unwrap_or_default(),
            opt(r.tls().map(|t| &t.version)),
            opt(r.tls().map(|t| &t.suite)),
            opt(r.tls().and_then(|t| t.alpn.as_ref())),
            opt(r.tls().map(|t| u32::from(t.resumed))),
            opt(r.churn_start().map(|c| ms3(c.started_ms))),
            opt(r.churn_start().map(|c| ms3(c.start_lag_ms))),
            us(r.corrected_us_min),
            opt(r.corrected_ms_avg().map(ms3)),
            us(r.corrected_us_max),
            r.sends_failed.to_string(),
        ])?;
    }
    w.flush()
        .with_context(|| format!("writing the connections CSV {}", path.display()))?;
    Ok(())
}
