//! The spreadsheet report (rust_xlsxwriter): "Summary" first (landscape, one page, with the
//! response-time distribution and messages-per-second charts), then "Connections" (one row per
//! connection) and "Timeline" (one row per second of phase 2); with agents an "Agents" sheet (one
//! row per client PC), and with `--forwarder` a "Backends" sheet (one row per backend, and a
//! chart). Every cell holds a computed number,
//! never a formula: formulas would be stored with a cached result of 0 and show 0 in viewers that
//! do not recalculate.

use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;
use rust_xlsxwriter::{Chart, ChartType, Format, FormatAlign, Workbook, Worksheet, XlsxError};

use crate::config::Workload;
use crate::coordinator::Outcome;
use crate::failure::Cause;
use crate::summary::{Group, Summary};

pub const SUMMARY: &str = "Summary";
pub const CONNECTIONS: &str = "Connections";
pub const TIMELINE: &str = "Timeline";
pub const AGENTS: &str = "Agents";
pub const BACKENDS: &str = "Backends";
pub const TLS: &str = "TLS";

/// Column titles of the Agents and Backends sheets, in order (the first is the agent's or the
/// backend's name).
pub const GROUP_COLUMNS: [&str; 14] = [
    "name",
    "connections",
    "up",
    "failed to open",
    "lost",
    "messages",
    "messages/s",
    "avg response ms",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "p99.9 ms",
    "max ms",
    "min ms",
];

/// Column titles of the Connections sheet, in order.
pub const CONNECTION_COLUMNS: [&str; 22] = [
    "id",
    "process",
    "local port",
    "connect ms",
    "handshake ms",
    "messages",
    "bytes sent",
    "bytes received",
    "min response ms",
    "avg response ms",
    "max response ms",
    "errors",
    "error",
    "agent",
    "local address",
    "backend",
    "TLS version",
    "cipher suite",
    "ALPN",
    "resumed",
    "started ms",
    "start lag ms",
];

/// Column titles of the Connections sheet after [`CONNECTION_COLUMNS`]: from the intended send
/// time (`--rate`), and the scheduled sends the connection never completed.
pub const CORRECTED_COLUMNS: [&str; 4] = [
    "corrected min ms",
    "corrected avg ms",
    "corrected max ms",
    "sends failed",
];

/// Column titles of the Agents and Backends sheets after [`GROUP_COLUMNS`] (whose times are
/// the corrected ones under `--rate`): the measured p99 beside them, and fairness.
pub const GROUP_EXTRA_COLUMNS: [&str; 5] = [
    "uncorrected p99 ms",
    "min messages per connection",
    "median messages per connection",
    "max messages per connection",
    "Jain's index",
];

/// Column titles of the Timeline sheet, in order.
pub const TIMELINE_COLUMNS: [&str; 8] = [
    "second",
    "messages/s",
    "errors",
    "avg response ms",
    "max response ms",
    "corrected avg ms",
    "corrected max ms",
    "sends failed",
];

/// Chart size in pixels: two charts stacked beside the tables fill a landscape page at about
/// the same height as the tables (rows are 20 px).
const CHART_WIDTH: u32 = 660;
const CHART_HEIGHT: u32 = 500;
const SECOND_CHART_ROW: u32 = 27;

struct Formats {
    title: Format,
    heading: Format,
    header: Format,
    ms: Format,
    int: Format,
    rate: Format,
}

impl Formats {
    fn new() -> Formats {
        Formats {
            title: Format::new().set_bold().set_font_size(14),
            heading: Format::new().set_bold().set_font_size(11),
            header: Format::new()
                .set_bold()
                .set_text_wrap()
                .set_align(FormatAlign::Center)
                .set_background_color("#DCE6F1"),
            ms: Format::new().set_num_format("0.000"),
            int: Format::new().set_num_format("#,##0"),
            rate: Format::new().set_num_format("#,##0.0"),
        }
    }
}

/// Writes the report to `path`, creating its folder if needed.
pub fn write(path: &Path, outcome: &Outcome, summary: &Summary) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the report folder {}", dir.display()))?;
    }
    let f = Formats::new();
    let mut workbook = Workbook::new();
    workbook.push_worksheet(summary_sheet(outcome, summary, &f)?);
    workbook.push_worksheet(connections_sheet(outcome, &f)?);
    workbook.push_worksheet(timeline_sheet(outcome, &f)?);
    if !summary.agents.is_empty() {
        workbook.push_worksheet(group_sheet(AGENTS, &summary.agents, &f)?);
    }
    if !summary.backends.is_empty() {
        workbook.push_worksheet(group_sheet(BACKENDS, &summary.backends, &f)?);
    }
    if summary.negotiated.is_some() || summary.churn.is_some() {
        workbook.push_worksheet(tls_sheet(summary, &f)?);
    }
    workbook
        .save(path)
        .with_context(|| format!("writing the report {}", path.display()))?;
    Ok(())
}

/// One bar of the distribution chart: messages whose response time was at most `upper_ms`
/// (and above the previous bar's bound).
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub upper_ms: f64,
    pub messages: u64,
}

/// Bar bounds per decade, in tenths of the decade, so a typical run gets 10 to 20 bars.
const STEPS: [u64; 6] = [10, 15, 20, 30, 50, 70];

/// Buckets the histogram (µs) into bars up to its maximum. The first bar ("≤ bound") starts at
/// the 0.1th percentile and also holds the few faster outliers, so a handful of them does not
/// spread the chart over a decade of empty bars.
pub fn distribution(h: &Histogram<u64>) -> Vec<Bar> {
    let values: Vec<(u64, u64)> = h
        .iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect();
    let Some(&(max_us, _)) = values.last() else {
        return Vec::new();
    };
    let min_us = h.highest_equivalent(h.value_at_quantile(0.001));
    // Bounds in whole microseconds (exact, unlike multiplying floats), 10 µs and up.
    let mut bounds: Vec<u64> = Vec::new();
    let mut decade = 10u64;
    while bounds.last().is_none_or(|&b| b < max_us) {
        bounds.extend(STEPS.iter().map(|s| s * decade / 10));
        decade = decade.saturating_mul(10);
    }
    let first = bounds
        .iter()
        .position(|&b| b >= min_us)
        .unwrap_or(bounds.len() - 1);
    let last = bounds
        .iter()
        .position(|&b| b >= max_us)
        .unwrap_or(bounds.len() - 1);
    let mut bars: Vec<Bar> = bounds[first..=last.max(first)]
        .iter()
        .map(|&us| Bar {
            upper_ms: us as f64 / 1000.0,
            messages: 0,
        })
        .collect();
    for (us, count) in values {
        let i = bars
            .iter()
            .position(|b| us as f64 / 1000.0 <= b.upper_ms)
            .unwrap_or(bars.len() - 1);
        bars[i].messages += count;
    }
    bars
}

fn bar_label(upper_ms: f64) -> String {
    let s = format!("{upper_ms:.3}");
    format!("≤{}", s.trim_end_matches('0').trim_end_matches('.'))
}

fn summary_sheet(outcome: &Outcome, s: &Summary, f: &Formats) -> Result<Worksheet, XlsxError> {
    let mut ws = Worksheet::new();
    ws.set_name(SUMMARY)?;
    ws.set_landscape();
    ws.set_print_fit_to_pages(1, 1);
    ws.set_column_width(0, 26)?;
    ws.set_column_width(1, 26)?;
    ws.set_column_width(2, 12)?;
    ws.set_column_width(3, 2)?;
    ws.set_column_width(4, 12)?;
    ws.set_column_width(5, 11)?;
    // The per-agent and per-backend tables start in column H, under the charts.
    ws.set_column_width(7, 20)?;
    ws.write_string_with_format(0, 0, "ssl-echo-client run", &f.title)?;

    let c = &outcome.config;
    let mut row = 2;
    let heading = |ws: &mut Worksheet, row: &mut u32, text: &str| -> Result<(), XlsxError> {
        *row += 1;
        ws.write_string_with_format(*row - 1, 0, text, &f.heading)?;
        Ok(())
    };
    let text = |ws: &mut Worksheet, row: &mut u32, k: &str, v: &str| -> Result<(), XlsxError> {
        ws.write_string(*row, 0, k)?;
        ws.write_string(*row, 1, v)?;
        *row += 1;
        Ok(())
    };
    let num = |ws: &mut Worksheet,
               row: &mut u32,
               k: &str,
               v: f64,
               fmt: &Format|
     -> Result<(), XlsxError> {
        ws.write_string(*row, 0, k)?;
        ws.write_number_with_format(*row, 1, v, fmt)?;
        *row += 1;
        Ok(())
    };

    heading(&mut ws, &mut row, "Parameters")?;
    text(
        &mut ws,
        &mut row,
        "target",
        &format!("{}:{}", s.host, s.port),
    )?;
    text(&mut ws, &mut row, "server name (SNI)", &s.server_name)?;
    text(
        &mut ws,
        &mut row,
        "transport",
        if s.tls { "TLS" } else { "plain TCP" },
    )?;
    let shown: String = c.message.chars().take(200).collect();
    text(&mut ws, &mut row, "message", &shown)?;
    num(
        &mut ws,
        &mut row,
        "message bytes",
        s.message_bytes as f64,
        &f.int,
    )?;
    match c.workload {
        Workload::Count(m) => num(
            &mut ws,
            &mut row,
            "messages per connection",
            m as f64,
            &f.int,
        )?,
        Workload::DurationSecs(d) => num(&mut ws, &mut row, "duration asked (s)", d, &f.rate)?,
    }
    num(
        &mut ws,
        &mut row,
        "connections",
        c.connections as f64,
        &f.int,
    )?;
    if c.connect_rate > 0.0 {
        num(
            &mut ws,
            &mut row,
            "connect rate (/s)",
            c.connect_rate,
            &f.rate,
        )?;
    } else {
        text(&mut ws, &mut row, "connect rate (/s)", "unlimited")?;
    }
    match c.rate {
        Some(r) => num(
            &mut ws,
            &mut row,
            "send rate (/s per connection)",
            r,
            &f.rate,
        )?,
        None => text(
            &mut ws,
            &mut row,
            "send rate",
            "closed loop (send, wait, send)",
        )?,
    }
    num(&mut ws, &mut row, "processes", s.processes as f64, &f.int)?;
    num(&mut ws, &mut row, "timeout ms", c.timeout_ms as f64, &f.int)?;

    row += 1;
    heading(&mut ws, &mut row, "Run")?;
    text(&mut ws, &mut row, "started", &s.started_at)?;
    text(&mut ws, &mut row, "ended", &s.ended_at)?;
    num(&mut ws, &mut row, "connect phase (s)", s.connect_s, &f.ms)?;
    num(&mut ws, &mut row, "exchange phase (s)", s.duration_s, &f.ms)?;

    row += 1;
    heading(&mut ws, &mut row, "Totals")?;
    num(
        &mut ws,
        &mut row,
        "connections up",
        s.connections_ok as f64,
        &f.int,
    )?;
    num(
        &mut ws,
        &mut row,
        "connections failed to open",
        s.connections_failed as f64,
        &f.int,
    )?;
    num(
        &mut ws,
        &mut row,
        "connections lost",
        s.connections_lost as f64,
        &f.int,
    )?;
    num(&mut ws, &mut row, "messages", s.messages as f64, &f.int)?;
    num(&mut ws, &mut row, "bytes sent", s.bytes_sent as f64, &f.int)?;
    num(
        &mut ws,
        &mut row,
        "bytes received",
        s.bytes_received as f64,
        &f.int,
    )?;
    num(&mut ws, &mut row, "messages/s", s.messages_per_sec, &f.rate)?;
    num(&mut ws, &mut row, "send window (s)", s.send_window_s, &f.ms)?;
    num(&mut ws, &mut row, "drain (s)", s.drain_s, &f.ms)?;
    num(
        &mut ws,
        &mut row,
        "echoes in the drain",
        s.messages_drained as f64,
        &f.int,
    )?;
    if let Some(offered) = s.offered_messages_per_sec {
        num(&mut ws, &mut row, "offered messages/s", offered, &f.rate)?;
        num(
            &mut ws,
            &mut row,
            "scheduled sends failed",
            s.sends_failed as f64,
            &f.int,
        )?;
    }
    if let Some(l) = &s.littles_law {
        num(
            &mut ws,
            &mut row,
            "Little's law N/rate (ms)",
            l.predicted_avg_ms,
            &f.ms,
        )?;
        text(
            &mut ws,
            &mut row,
            "closed loop",
            "latency ≈ connections / rate; use --rate for latency at a given load",
        )?;
    }

    row += 1;
    heading(&mut ws, &mut row, "Messages per connection")?;
    let fair = &s.fairness;
    for (k, v) in [
        ("min", fair.min),
        ("p1", fair.p1),
        ("median", fair.median),
        ("max", fair.max),
    ] {
        num(&mut ws, &mut row, k, v as f64, &f.int)?;
    }
    num(&mut ws, &mut row, "Jain's index", fair.jain, &f.ms)?;

    row += 1;
    heading(&mut ws, &mut row, "Client")?;
    num(&mut ws, &mut row, "hiccup p99 ms", s.hiccup_ms.p99, &f.ms)?;
    num(&mut ws, &mut row, "hiccup max ms", s.hiccup_ms.max, &f.ms)?;
    for c in &s.client_cpu {
        num(
            &mut ws,
            &mut row,
            &format!("process {} cpu % (avg)", c.process),
            c.avg_pct,
            &f.rate,
        )?;
        num(
            &mut ws,
            &mut row,
            &format!("process {} cpu % (max)", c.process),
            c.max_pct,
            &f.rate,
        )?;
    }
    num(
        &mut ws,
        &mut row,
        "saturated seconds",
        s.client_saturated_seconds as f64,
        &f.int,
    )?;
    if let Some(w) = s.saturation_warning() {
        text(&mut ws, &mut row, "WARNING", &w)?;
    }
    if !s.slo.is_empty() {
        row += 1;
        heading(&mut ws, &mut row, "Objectives (--slo)")?;
        for v in &s.slo {
            ws.write_string(row, 0, &v.slo)?;
            ws.write_string(row, 1, if v.passed { "pass" } else { "FAIL" })?;
            if let Some(m) = v.measured {
                ws.write_number_with_format(row, 2, m, &f.ms)?;
            }
            row += 1;
        }
    }

    row += 1;
    ws.write_string_with_format(row, 0, "Response time (ms)", &f.heading)?;
    ws.write_string_with_format(row, 1, "measured from send", &f.header)?;
    if s.corrected_response_ms.is_some() {
        ws.write_string_with_format(row, 2, "from intended send", &f.header)?;
    }

    row += 1;
    let corrected = s.corrected_response_ms.map(|c| c.named());
    for (i, (name, value)) in s.response_ms.named().into_iter().enumerate() {
        ws.write_string(row, 0, name)?;
        ws.write_number_with_format(row, 1, value, &f.ms)?;
        if let Some(c) = &corrected {
            ws.write_number_with_format(row, 2, c[i].1, &f.ms)?;
        }
        row += 1;
    }

    if s.handshake_ms.max > 0.0 {
        row += 1;
        heading(&mut ws, &mut row, "Open time (ms): connect + handshake")?;
        for (name, value) in s.handshake_ms.named() {
            num(&mut ws, &mut row, &format!("open {name}"), value, &f.ms)?;
        }
    }

    row += 1;
    heading(&mut ws, &mut row, "Failures by cause")?;
    for cause in Cause::ALL {
        let n = s.errors.get(cause.name()).copied().unwrap_or(0);
        num(&mut ws, &mut row, cause.name(), n as f64, &f.int)?;
    }
    num(&mut ws, &mut row, "total", s.errors_total as f64, &f.int)?;

    // Chart data: the distribution table in columns E and F; from the intended send time under
    // --rate (the figure the run is judged by).
    let corrected = c.rate.is_some();
    let bars = distribution(if corrected {
        &outcome.corrected
    } else {
        &outcome.response
    });
    ws.write_string_with_format(2, 4, "response ms", &f.header)?;
    ws.write_string_with_format(2, 5, "messages", &f.header)?;
    for (i, bar) in bars.iter().enumerate() {
        let r = 3 + i as u32;
        ws.write_string(r, 4, bar_label(bar.upper_ms))?;
        ws.write_number_with_format(r, 5, bar.messages as f64, &f.int)?;
    }
    if !bars.is_empty() {
        let last = 2 + bars.len() as u32;
        let mut chart = Chart::new(ChartType::Column);
        chart
            .add_series()
            .set_categories((SUMMARY, 3, 4, last, 4))
            .set_values((SUMMARY, 3, 5, last, 5))
            .set_gap(30);
        chart.title().set_name(if corrected {
            "Response time distribution (from the intended send)"
        } else {
            "Response time distribution"
        });
        chart.x_axis().set_name("response time (ms, upper bound)");
        chart.y_axis().set_name("messages");
        chart.legend().set_hidden();
        chart.set_width(CHART_WIDTH).set_height(CHART_HEIGHT);
        ws.insert_chart(1, 7, &chart)?;
    }
    let seconds = outcome.timeline.len() as u32;
    if seconds > 0 {
        let mut chart = Chart::new(ChartType::Line);
        chart
            .add_series()
            .set_categories((TIMELINE, 1, 0, seconds, 0))
            .set_values((TIMELINE, 1, 1, seconds, 1));
        chart.title().set_name("Messages per second");
        chart.x_axis().set_name("second of the exchange phase");
        chart.y_axis().set_name("messages/s");
        chart.legend().set_hidden();
        chart.set_width(CHART_WIDTH).set_height(CHART_HEIGHT);
        ws.insert_chart(SECOND_CHART_ROW, 7, &chart)?;
    }
    // Per agent and per backend, below the charts (so the page still fits one printed sheet).
    let mut row = SECOND_CHART_ROW + 27;
    for (title, groups) in [("Per agent", &s.agents), ("Per backend", &s.backends)] {
        if groups.is_empty() {
            continue;
        }
        ws.write_string_with_format(row, 7, title, &f.heading)?;
        write_groups(&mut ws, row + 1, 7, groups, f)?;
        row += groups.len() as u32 + 3;
    }
    Ok(ws)
}

fn connections_sheet(outcome: &Outcome, f: &Formats) -> Result<Worksheet, XlsxError> {
    let mut ws = Worksheet::new();
    ws.set_name(CONNECTIONS)?;
    for (col, title) in CONNECTION_COLUMNS
        .iter()
        .chain(CORRECTED_COLUMNS.iter())
        .enumerate()
    {
        ws.write_string_with_format(0, col as u16, *title, &f.header)?;
        ws.set_column_width(col as u16, if col == 12 { 60 } else { 11 })?;
        if col > 12 {
            ws.set_column_width(col as u16, 18)?;
        }
    }
    ws.set_row_height(0, 30)?;
    ws.set_freeze_panes(1, 0)?;
    let ms = |us: u64| us as f64 / 1000.0;
    for (i, r) in outcome.records.iter().enumerate() {
        let row = 1 + i as u32;
        ws.write_number(row, 0, r.id as f64)?;
        ws.write_number(row, 1, r.process as f64)?;
        if let Some(p) = r.local_port {
            ws.write_number(row, 2, p as f64)?;
        }
        if let Some(v) = r.connect_ms {
            ws.write_number_with_format(row, 3, v, &f.ms)?;
        }
        if let Some(v) = r.handshake_ms {
            ws.write_number_with_format(row, 4, v, &f.ms)?;
        }
        ws.write_number(row, 5, r.messages as f64)?;
        ws.write_number(row, 6, r.bytes_sent as f64)?;
        ws.write_number(row, 7, r.bytes_received as f64)?;
        if let Some(v) = r.response_us_min {
            ws.write_number_with_format(row, 8, ms(v), &f.ms)?;
        }
        if let Some(v) = r.response_ms_avg() {
            ws.write_number_with_format(row, 9, v, &f.ms)?;
        }
        if let Some(v) = r.response_us_max {
            ws.write_number_with_format(row, 10, ms(v), &f.ms)?;
        }
        ws.write_number(row, 11, u32::from(r.failure.is_some()) as f64)?;
        if let Some(failure) = &r.failure {
            ws.write_string(row, 12, failure.to_string())?;
        }
        ws.write_string(row, 13, r.agent.as_deref().unwrap_or("local"))?;
        if let Some(ip) = r.local_ip {
            ws.write_string(row, 14, ip.to_string())?;
        }
        if let Some(b) = &r.backend {
            ws.write_string(row, 15, b)?;
        }
        write_tls_columns(&mut ws, row, r, f)?;
        // The corrected columns follow CONNECTION_COLUMNS (the TLS and churn columns end it).
        let c = CONNECTION_COLUMNS.len() as u16;
        if let Some(v) = r.corrected_us_min {
            ws.write_number_with_format(row, c, ms(v), &f.ms)?;
        }
        if let Some(v) = r.corrected_ms_avg() {
            ws.write_number_with_format(row, c + 1, v, &f.ms)?;
        }
        if let Some(v) = r.corrected_us_max {
            ws.write_number_with_format(row, c + 2, ms(v), &f.ms)?;
        }
        ws.write_number(row, c + 3, r.sends_failed as f64)?;
    }
    let last = outcome.records.len() as u32;
    let columns = CONNECTION_COLUMNS.len() + CORRECTED_COLUMNS.len();
    ws.autofilter(0, 0, last.max(1), (columns - 1) as u16)?;
    Ok(ws)
}

/// The [`GROUP_COLUMNS`] header at (`row`, `col`) and one row per group below it.
fn write_groups(
    ws: &mut Worksheet,
    row: u32,
    col: u16,
    groups: &[Group],
    f: &Formats,
) -> Result<(), XlsxError> {
    for (k, title) in GROUP_COLUMNS
        .iter()
        .chain(GROUP_EXTRA_COLUMNS.iter())
        .enumerate()
    {
        ws.write_string_with_format(row, col + k as u16, *title, &f.header)?;
    }
    for (i, g) in groups.iter().enumerate() {
        let row = row + 1 + i as u32;
        ws.write_string(row, col, &g.name)?;
        let counts = [
            g.connections,
            g.connections_ok,
            g.connections_failed,
            g.connections_lost,
            g.messages,
        ];
        for (k, n) in counts.into_iter().enumerate() {
            ws.write_number_with_format(row, col + 1 + k as u16, n as f64, &f.int)?;
        }
        ws.write_number_with_format(row, col + 6, g.messages_per_sec, &f.rate)?;
        for (k, (_, v)) in g.headline().named().into_iter().enumerate() {
            ws.write_number_with_format(row, col + 7 + k as u16, v, &f.ms)?;
        }
        let extra = col + GROUP_COLUMNS.len() as u16;
        ws.write_number_with_format(row, extra, g.response_ms.p99, &f.ms)?;
        for (k, n) in [g.fairness.min, g.fairness.median, g.fairness.max]
            .into_iter()
            .enumerate()
        {
            ws.write_number_with_format(row, extra + 1 + k as u16, n as f64, &f.int)?;
        }
        ws.write_number_with_format(row, extra + 4, g.fairness.jain, &f.ms)?;
    }
    Ok(())
}

/// One row per agent or backend, and a chart of connections and messages per row.
fn group_sheet(name: &str, groups: &[Group], f: &Formats) -> Result<Worksheet, XlsxError> {
    let mut ws = Worksheet::new();
    ws.set_name(name)?;
    ws.set_landscape();
    for col in 0..GROUP_COLUMNS.len() {
        ws.set_column_width(col as u16, if col == 0 { 22 } else { 11 })?;
    }
    ws.set_row_height(0, 30)?;
    write_groups(&mut ws, 0, 0, groups, f)?;
    let last = groups.len() as u32;
    let mut chart = Chart::new(ChartType::Column);
    chart
        .add_series()
        .set_name("connections")
        .set_categories((name, 1, 0, last, 0))
        .set_values((name, 1, 1, last, 1));
    chart
        .add_series()
        .set_name("messages/s")
        .set_categories((name, 1, 0, last, 0))
        .set_values((name, 1, 6, last, 6));
    let title = format!(
        "Connections and messages/s per {}",
        name.trim_end_matches('s').to_lowercase()
    );
    chart.title().set_name(&title);
    chart
        .set_width(CHART_WIDTH)
        .set_height(CHART_HEIGHT / 2 + 100);
    ws.insert_chart(last + 2, 0, &chart)?;
    Ok(ws)
}

fn timeline_sheet(outcome: &Outcome, f: &Formats) -> Result<Worksheet, XlsxError> {
    let mut ws = Worksheet::new();
    ws.set_name(TIMELINE)?;
    for (col, title) in TIMELINE_COLUMNS.iter().enumerate() {
        ws.write_string_with_format(0, col as u16, *title, &f.header)?;
        ws.set_column_width(col as u16, 14)?;
    }
    ws.set_freeze_panes(1, 0)?;
    let n = outcome.timeline.len();
    for (i, sec) in outcome.timeline.iter().enumerate() {
        let row = 1 + i as u32;
        // The last second is usually partial: its rate is scaled to the part that ran.
        let span = if i + 1 == n {
            (outcome.exchange_s - i as f64).clamp(0.001, 1.0)
        } else {
            1.0
        };
        ws.write_number(row, 0, (i + 1) as f64)?;
        ws.write_number_with_format(row, 1, sec.messages as f64 / span, &f.rate)?;
        ws.write_number(row, 2, sec.errors as f64)?;
        if sec.messages > 0 {
            let avg = sec.response_us_sum as f64 / sec.messages as f64 / 1000.0;
            ws.write_number_with_format(row, 3, avg, &f.ms)?;
            ws.write_number_with_format(row, 4, sec.response_us_max as f64 / 1000.0, &f.ms)?;
            if outcome.config.rate.is_some() {
                let avg = sec.corrected_us_sum as f64 / sec.messages as f64 / 1000.0;
                ws.write_number_with_format(row, 5, avg, &f.ms)?;
            }
        }
        if outcome.config.rate.is_some() && sec.corrected_us_max > 0 {
            ws.write_number_with_format(row, 6, sec.corrected_us_max as f64 / 1000.0, &f.ms)?;
        }
        ws.write_number(row, 7, sec.sends_failed as f64)?;
    }
    Ok(ws)
}

/// Columns 16.. of the Connections sheet: what the handshake negotiated, and the churn schedule.
fn write_tls_columns(
    ws: &mut Worksheet,
    row: u32,
    r: &crate::session::ConnectionRecord,
    f: &Formats,
) -> Result<(), XlsxError> {
    if let Some(t) = r.tls() {
        ws.write_string(row, 16, &t.version)?;
        ws.write_string(row, 17, &t.suite)?;
        if let Some(alpn) = &t.alpn {
            ws.write_string(row, 18, alpn)?;
        }
        ws.write_number(row, 19, u32::from(t.resumed) as f64)?;
    }
    if let Some(c) = r.churn_start() {
        ws.write_number_with_format(row, 20, c.started_ms, &f.ms)?;
        ws.write_number_with_format(row, 21, c.start_lag_ms, &f.ms)?;
    }
    Ok(())
}

/// The "TLS" sheet: what the handshakes negotiated (counts by version, suite, ALPN; the resumed
/// share) and, with `--churn`, the handshake capacity figures. Label in column A, value in B.
fn tls_sheet(s: &Summary, f: &Formats) -> Result<Worksheet, XlsxError> {
    let mut ws = Worksheet::new();
    ws.set_name(TLS)?;
    ws.set_column_width(0, 44)?;
    ws.set_column_width(1, 14)?;
    let mut row = 0;
    let num = |ws: &mut Worksheet, row: &mut u32, k: &str, v: f64, fmt: &Format| {
        ws.write_string(*row, 0, k)?;
        ws.write_number_with_format(*row, 1, v, fmt)?;
        *row += 1;
        Ok::<(), XlsxError>(())
    };
    if let Some(n) = &s.negotiated {
        ws.write_string_with_format(row, 0, "Negotiated", &f.heading)?;
        row += 1;
        num(&mut ws, &mut row, "handshakes", n.handshakes as f64, &f.int)?;
        num(&mut ws, &mut row, "resumed", n.resumed as f64, &f.int)?;
        num(&mut ws, &mut row, "resumed %", n.resumed_pct, &f.rate)?;
        for (title, counts) in [
            ("version", &n.versions),
            ("cipher suite", &n.suites),
            ("ALPN", &n.alpn),
        ] {
            for (name, count) in counts {
                num(
                    &mut ws,
                    &mut row,
                    &format!("{title} {name}"),
                    *count as f64,
                    &f.int,
                )?;
            }
        }
        row += 1;
    }
    if let Some(c) = &s.churn {
        ws.write_string_with_format(row, 0, "Handshake capacity (--churn)", &f.heading)?;
        row += 1;
        for (k, v, fmt) in [
            ("asked (/s)", c.asked_per_sec, &f.rate),
            ("window (s)", c.window_s, &f.ms),
            ("opened", c.opened as f64, &f.int),
            ("up", c.established as f64, &f.int),
            ("failed", c.failed as f64, &f.int),
            ("achieved (/s)", c.achieved_per_sec, &f.rate),
            ("achieved % of asked", c.achieved_pct, &f.rate),
            ("handshake p50 ms", c.handshake_ms.p50, &f.ms),
            ("handshake p99 ms", c.handshake_ms.p99, &f.ms),
            ("handshake max ms", c.handshake_ms.max, &f.ms),
            ("connect p50 ms", c.connect_ms.p50, &f.ms),
            ("connect p99 ms", c.connect_ms.p99, &f.ms),
            ("started late (> 10 ms)", c.started_late as f64, &f.int),
            ("max start lag ms", c.start_lag_max_ms, &f.ms),
        ] {
            num(&mut ws, &mut row, k, v, fmt)?;
        }
    }
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::new_histogram;

    #[test]
    fn distribution_covers_min_to_max_and_keeps_every_message() {
        let mut h = new_histogram();
        h.record_n(180, 10).unwrap(); // 0.18 ms
        h.record_n(2_500, 5).unwrap(); // 2.5 ms
        h.record_n(9_000, 1).unwrap(); // 9 ms
        let bars = distribution(&h);
        let uppers: Vec<String> = bars.iter().map(|b| format!("{}", b.upper_ms)).collect();
        assert_eq!(
            uppers,
            ["0.2", "0.3", "0.5", "0.7", "1", "1.5", "2", "3", "5", "7", "10"]
        );
        assert_eq!(bars[0].messages, 10);
        assert_eq!(bars[7].messages, 5);
        assert_eq!(bars[10].messages, 1);
        assert_eq!(bars.iter().map(|b| b.messages).sum::<u64>(), 16);
        assert_eq!(bar_label(0.2), "≤0.2");
        assert_eq!(bar_label(0.15), "≤0.15");
        assert_eq!(bar_label(10.0), "≤10");
        assert_eq!(bar_label(1.5), "≤1.5");
        assert_eq!(bar_label(1500.0), "≤1500");
    }

    #[test]
    fn a_few_fast_outliers_join_the_first_bar() {
        let mut h = new_histogram();
        h.record_n(10, 1).unwrap(); // 0.01 ms, one in 10,001
        h.record_n(4_000, 10_000).unwrap(); // 4 ms
        let bars = distribution(&h);
        assert_eq!(bars.len(), 1, "{bars:?}");
        assert_eq!(bars[0].upper_ms, 5.0);
        assert_eq!(bars[0].messages, 10_001);
    }

    #[test]
    fn one_value_gives_one_bar() {
        let mut h = new_histogram();
        h.record_n(1_000, 3).unwrap();
        let bars = distribution(&h);
        assert_eq!(bars.len(), 1);
        assert_eq!(bars[0].upper_ms, 1.0);
        assert_eq!(bars[0].messages, 3);
    }
}
