//! The live display on standard error: one line per node with its step and how long it has
//! been in it, plus the probe's live stall and write rate. On a terminal the lines are redrawn
//! in place; otherwise events are printed as they happen and a status line every few seconds
//! (readable in CI logs).

use std::io::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::fleet::Fleet;

/// How often a non-terminal display prints a status line.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
struct NodeLine {
    name: String,
    step: String,
    since: Instant,
}

#[derive(Debug)]
struct State {
    lines: Vec<NodeLine>,
    /// Which node is being worked on.
    current: Option<usize>,
    /// Live figures: (open stall seconds, writes per second).
    live: Option<(f64, f64)>,
    /// Lines of the table drawn last (terminal only).
    drawn: usize,
}

/// The display; cheap to clone.
#[derive(Debug, Clone)]
pub struct Progress {
    started: Instant,
    tty: bool,
    quiet: bool,
    state: Arc<Mutex<State>>,
}

impl Progress {
    /// A display for `nodes`; `quiet` prints nothing.
    pub fn new(nodes: &[String], quiet: bool) -> Progress {
        let now = Instant::now();
        Progress {
            started: now,
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            quiet,
            state: Arc::new(Mutex::new(State {
                lines: nodes
                    .iter()
                    .map(|n| NodeLine {
                        name: n.clone(),
                        step: "waiting".into(),
                        since: now,
                    })
                    .collect(),
                current: None,
                live: None,
                drawn: 0,
            })),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `node` enters `step`; printed as an event.
    pub fn step(&self, node: &str, step: &str) {
        {
            let mut s = self.state();
            if let Some(i) = s.lines.iter().position(|l| l.name == node) {
                s.lines[i].step = step.to_owned();
                s.lines[i].since = Instant::now();
                s.current = Some(i);
            }
        }
        self.event(&format!("{node}: {step}"));
    }

    /// Prints one event line (above the table on a terminal).
    pub fn event(&self, text: &str) {
        if self.quiet {
            return;
        }
        let line = format!("[{:>7.1}s] {text}", self.started.elapsed().as_secs_f64());
        let mut s = self.state();
        let mut err = std::io::stderr().lock();
        if self.tty {
            clear(&mut err, s.drawn);
            let _ = writeln!(err, "{line}");
            s.drawn = draw(&mut err, &s);
        } else {
            let _ = writeln!(err, "{line}");
        }
    }

    /// Polls the probe's live figures and refreshes the display until the returned handle is
    /// aborted.
    pub fn spawn_ticker(&self, fleet: Fleet) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut last_plain = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let live = fleet.probe_status(Duration::from_secs(10)).await.map(|v| {
                    let secs = v.window_seconds.max(1.0);
                    (v.window.open_stall_seconds, v.window.acked as f64 / secs)
                });
                if me.quiet {
                    continue;
                }
                let mut s = me.state();
                s.live = live;
                let mut err = std::io::stderr().lock();
                if me.tty {
                    clear(&mut err, s.drawn);
                    s.drawn = draw(&mut err, &s);
                } else if last_plain.elapsed() >= PLAIN_EVERY {
                    last_plain = Instant::now();
                    if let Some(i) = s.current {
                        let _ = writeln!(
                            err,
                            "[{:>7.1}s] {}",
                            me.started.elapsed().as_secs_f64(),
                            status_line(&s.lines[i], s.live)
                        );
                    }
                }
            }
        })
    }

    /// Leaves the terminal clean for the report.
    pub fn finish(&self) {
        if self.tty && !self.quiet {
            let mut s = self.state();
            let mut err = std::io::stderr().lock();
            clear(&mut err, s.drawn);
            s.drawn = draw(&mut err, &s);
            s.drawn = 0;
        }
    }
}

fn status_line(l: &NodeLine, live: Option<(f64, f64)>) -> String {
    let live = live
        .map(|(stall, rate)| format!(" · stall {stall:.2}s · {rate:.1} writes/s"))
        .unwrap_or_default();
    // A finished node's clock stops.
    let finished = l.step == "done" || l.step.starts_with("skipped");
    let elapsed = if finished {
        String::new()
    } else {
        format!("{:>7.1}s", l.since.elapsed().as_secs_f64())
    };
    format!("{:<10} {:<26} {elapsed}{live}", l.name, l.step)
}

fn clear(err: &mut impl std::io::Write, lines: usize) {
    if lines > 0 {
        let _ = write!(err, "\x1b[{lines}A\x1b[J");
    }
}

fn draw(err: &mut impl std::io::Write, s: &State) -> usize {
    for (i, l) in s.lines.iter().enumerate() {
        let live = if Some(i) == s.current { s.live } else { None };
        let _ = writeln!(err, "  {}", status_line(l, live));
    }
    s.lines.len()
}
