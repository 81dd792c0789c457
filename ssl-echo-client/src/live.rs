//! What the operator sees while the run goes on, on stderr: a progress bar while connections
//! open (terminal only), then a live line with connections up, messages per second and errors
//! (redrawn in place on a terminal, one line every few seconds otherwise, e.g. in CI logs).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::interval::Latest;
use crate::recorder::LiveSnapshot;

/// How often the live line is redrawn on a terminal, and printed when not on one.
const REDRAW_TERMINAL: Duration = Duration::from_millis(500);
const REDRAW_LOG: Duration = Duration::from_secs(5);

pub struct Display {
    terminal: bool,
    total: u64,
    bar: Option<ProgressBar>,
    phase2_start: Option<Instant>,
    last_print: Instant,
    last_messages: u64,
    /// The live line on a terminal (indicatif redraws it in place).
    line: Option<ProgressBar>,
}

impl Display {
    /// `terminal`: stderr is a terminal (and the user did not ask for quiet output).
    pub fn new(total: u64, terminal: bool) -> Display {
        let bar = terminal.then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            // The template is a constant that indicatif accepts.
            bar.set_style(
                ProgressStyle::with_template(
                    "connecting {bar:40} {pos}/{len} [{elapsed_precise}] {msg}",
                )
                .expect("valid progress template"),
            );
            bar
        });
        Display {
            terminal,
            total,
            bar,
            phase2_start: None,
            last_print: Instant::now(),
            last_messages: 0,
            line: None,
        }
    }

    /// Phase 1 progress.
    pub fn connecting(&mut self, snap: &LiveSnapshot) {
        if let Some(bar) = &self.bar {
            bar.set_position(snap.phase1_done());
            if snap.connect_failed > 0 {
                bar.set_message(format!("{} failed", snap.connect_failed));
            }
        }
    }

    /// Phase 1 is over: replaces the bar with one line.
    pub fn connected(&mut self, snap: &LiveSnapshot, took: Duration) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        eprintln!(
            "{} of {} connections up, {} failed, in {:.2} s",
            snap.up,
            self.total,
            snap.connect_failed,
            took.as_secs_f64()
        );
        self.phase2_start = Some(Instant::now());
        self.last_print = Instant::now();
        self.last_messages = snap.messages;
    }

    /// Churn mode has no phase 1 to report: says what the open loop will do instead.
    pub fn churn_started(&mut self, churn: &crate::config::Churn) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        eprintln!(
            "churn: opening {} connections at {:.1}/s over {:.1} s (open loop, no barrier)",
            self.total, churn.rate, churn.window_s
        );
        self.phase2_start = Some(Instant::now());
        self.last_print = Instant::now();
        self.last_messages = 0;
    }

    /// Phase 2 progress; prints when it is time to. The rate is the messages answered since the
    /// last print over the time since it, the same counter the summary's msg/s divides by the
    /// send window; `avg` is that figure so far.
    pub fn exchanging(&mut self, snap: &LiveSnapshot, latest: Latest) {
        let every = if self.terminal {
            REDRAW_TERMINAL
        } else {
            REDRAW_LOG
        };
        let since = self.last_print.elapsed();
        if since < every {
            return;
        }
        let rate = snap.messages.saturating_sub(self.last_messages) as f64 / since.as_secs_f64();
        let elapsed = self.phase2_start.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let avg = if elapsed > 0.0 {
            snap.messages as f64 / elapsed
        } else {
            0.0
        };
        let line = format!(
            "[{elapsed:6.1} s] {} up  {:>9.0} msg/s (avg {:.0})  {} messages  {} errors  client cpu {:.0}%  hiccup p99 {:.1} ms{}",
            snap.open,
            rate,
            avg,
            snap.messages,
            snap.errors,
            latest.cpu_pct_max,
            latest.hiccup_p99_ms,
            if latest.saturated { "  CLIENT SATURATED" } else { "" }
        );
        if self.terminal {
            let line_bar = self.line.get_or_insert_with(|| {
                let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                // The template is a constant that indicatif accepts.
                bar.set_style(ProgressStyle::with_template("{msg}").expect("valid live template"));
                bar
            });
            line_bar.set_message(line);
        } else {
            eprintln!("{line}");
        }
        self.last_print = Instant::now();
        self.last_messages = snap.messages;
    }

    /// Ends the live line so the summary starts on a fresh line.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if let Some(line) = self.line.take() {
            // Leaves the last line on the screen, then the summary below it.
            line.finish();
        }
    }
}
