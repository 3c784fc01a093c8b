//! The migration progress display on stderr: an indicatif bar on a terminal, one line per
//! phase change otherwise (logs, CI).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use roam_control::units::{format_bytes, format_ms};
use roam_control::{Phase, Progress};

const TEMPLATE: &str = "{spinner} {prefix:<11} [{bar:20}] {bytes}/{total_bytes} {msg}";

pub struct Bar {
    bar: Option<ProgressBar>,
    phase: Option<Phase>,
}

impl Bar {
    pub fn new(vm: &str, to: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(TEMPLATE)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix("connect");
            bar.set_message(format!("moving {vm} to {to}"));
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Bar { bar, phase: None }
    }

    pub fn update(&mut self, p: &Progress) {
        let changed = self.phase != Some(p.phase);
        self.phase = Some(p.phase);
        let Some(bar) = &self.bar else {
            if changed {
                eprintln!("[{:>8}] {}", format_ms(p.elapsed_ms), p.phase);
            }
            return;
        };
        let (pos, len) = position(p);
        bar.set_length(len);
        bar.set_position(pos);
        if changed {
            bar.set_prefix(p.phase.to_string());
        }
        let mut msg = format!("{}/s", format_bytes(p.rate_bytes_per_s));
        if let Some(eta) = p.eta_ms {
            msg.push_str(&format!("  ETA {}", format_ms(eta)));
        }
        if let Some(d) = p.dirty_rate_pages_per_s {
            msg.push_str(&format!("  dirty {d} pages/s"));
        }
        bar.set_message(msg);
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// What the bar measures in each phase: the disk pass, then RAM (sent against sent +
/// still dirty, which converges as pre-copy does), otherwise everything.
fn position(p: &Progress) -> (u64, u64) {
    match p.phase {
        Phase::DiskBulk | Phase::DiskIterate | Phase::DiskPostcopy => {
            (p.disk_sent_bytes, p.disk_total_bytes.max(p.disk_sent_bytes))
        }
        Phase::Memory | Phase::Switchover => (
            p.memory_sent_bytes,
            p.memory_sent_bytes
                .saturating_add(p.memory_remaining_bytes)
                .max(1),
        ),
        _ => {
            let done = p.disk_sent_bytes.saturating_add(p.memory_sent_bytes);
            let total = p.disk_total_bytes.saturating_add(p.memory_total_bytes);
            (done, total.max(done))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_parses() {
        assert!(ProgressStyle::with_template(TEMPLATE).is_ok());
    }

    #[test]
    fn bar_position_follows_the_phase() {
        let mut p = Progress::new(Phase::DiskBulk);
        p.disk_sent_bytes = 10;
        p.disk_total_bytes = 100;
        p.memory_sent_bytes = 7;
        p.memory_remaining_bytes = 3;
        p.memory_total_bytes = 50;
        assert_eq!(position(&p), (10, 100));
        p.phase = Phase::Memory;
        assert_eq!(position(&p), (7, 10));
        p.phase = Phase::Verify;
        assert_eq!(position(&p), (17, 150));
    }
}
