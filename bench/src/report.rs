//! Renders a [`RunReport`]: a markdown table with Downbeat beside its peers, the JSON file,
//! and CDF plots as PNG; plus [`Progress`], the progress bar a scenario shows while it runs.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use plotters::prelude::*;

use crate::metrics::{Better, Metric, RunReport};

// ---------------------------------------------------------------------------------------------
// Markdown

/// The run as markdown: a heading (title, profile, the scenario's parameters), a table with
/// one row per metric and one column per system, footnotes, a line on the profile, machine,
/// wall time and command, and the run's notes as bullets.
///
/// Rows follow the first system's metrics, then keys only later systems have. After each
/// system but the first comes a ratio column comparing it with the first (Downbeat),
/// oriented so that above ×1 means Downbeat does better: `peer / downbeat` for
/// [`Better::Lower`], `downbeat / peer` for [`Better::Higher`]. When the report opens with
/// Downbeat over two transports (two leading systems named `downbeat…`), the second one's
/// ratio compares it with the first (what the second transport costs), and every later
/// column's ratio cell holds two ratios, `×a · ×b`: against the first and against the
/// second. A ratio is `n/a` when either value is missing, negative or not finite; `both 0`
/// when both are 0; `∞` when the divisor alone is 0 (a 0 where the other system has a
/// positive figure: as far as the measurement resolves, infinitely better; the two figures
/// stand beside it).
///
/// A missing value shows `n/a`; a metric's note (why it is missing, or how it was measured
/// for that system) becomes a numbered footnote `[n]` below the table, one number per
/// distinct text. With one system there are no ratio columns.
pub fn markdown(report: &RunReport) -> String {
    let mut out = String::new();
    let _ = write!(out, "### {} — profile `{}`", report.title, report.profile);
    let params = parameters_line(&report.parameters);
    if !params.is_empty() {
        let _ = write!(out, " ({params})");
    }
    out.push_str("\n\n");

    let systems = &report.systems;
    let baselines = baselines(report);
    let mut footnotes = Footnotes::default();
    if systems.is_empty() {
        out.push_str("No system reported any figures.\n");
    } else {
        out.push_str("| metric |");
        for (i, system) in systems.iter().enumerate() {
            let _ = write!(out, " {} |", cell_text(&system.display));
            if i > 0 {
                out.push_str(" ratio |");
            }
        }
        out.push_str("\n|:--|");
        out.push_str(&"--:|".repeat(systems.len() * 2 - 1));
        out.push('\n');

        for key in row_keys(report) {
            let metrics: Vec<Option<&Metric>> =
                systems.iter().map(|s| s.metrics.iter().find(|m| m.key == key)).collect();
            let Some(first_present) = metrics.iter().flatten().next() else { continue };
            let label = if first_present.unit.is_empty() {
                first_present.label.clone()
            } else {
                format!("{} ({})", first_present.label, first_present.unit)
            };
            let _ = write!(out, "| {} |", cell_text(&label));
            let downbeat = metrics[0];
            let better = downbeat.map_or(first_present.better, |m| m.better);
            for (i, metric) in metrics.iter().enumerate() {
                let mut cell = match metric.and_then(|m| m.value) {
                    Some(v) => format_value(v),
                    None => "n/a".to_owned(),
                };
                if let Some(note) = metric.and_then(|m| m.note.as_deref()) {
                    let _ = write!(cell, " [{}]", footnotes.number(note));
                }
                let _ = write!(out, " {} |", cell_text(&cell));
                if i > 0 {
                    let value = metric.and_then(|m| m.value);
                    let ratios: Vec<String> =
                        (0..baselines.min(i)).map(|b| ratio(metrics[b].and_then(|m| m.value), value, better)).collect();
                    let _ = write!(out, " {} |", ratios.join(" · "));
                }
            }
            out.push('\n');
        }
        if baselines == 2 && systems.len() > 2 {
            let _ = writeln!(
                out,
                "\nratio: how many times better {} does than the system in the column before it (above ×1: {0} \
                 better); after {}'s column, two ratios: against {0} · against {1}.",
                systems[0].display, systems[1].display
            );
        } else if systems.len() > 1 {
            let _ = writeln!(
                out,
                "\nratio: how many times better {} does than the system in the column before it (above ×1: {0} better).",
                systems[0].display
            );
        }
        if !footnotes.texts.is_empty() {
            out.push('\n');
            for (i, text) in footnotes.texts.iter().enumerate() {
                let _ = writeln!(out, "- [{}] {}", i + 1, text);
            }
        }
    }

    out.push_str(&run_footer(report));
    out
}

/// The paragraph under a run's table: the profile, the machine, the command, the notes.
pub fn run_footer(report: &RunReport) -> String {
    let mut out = String::new();
    let m = &report.machine;
    let _ = writeln!(
        out,
        "\nProfile `{}`: {}. Machine: {} CPUs ({}), {:.1} GiB, kernel {}, steal {:.1} %, load {:.2}. \
         Wall time {:.1} s{}. Command: `{}`",
        report.profile,
        if report.profile_parameters.is_empty() { "—" } else { &report.profile_parameters },
        m.cpus,
        if m.cpu_model.is_empty() { "unknown model" } else { &m.cpu_model },
        m.memory_gib,
        if m.kernel.is_empty() { "unknown" } else { &m.kernel },
        m.steal_percent,
        m.load_average,
        report.wall_seconds,
        if report.started_at.is_empty() { String::new() } else { format!(", started {}", report.started_at) },
        report.command,
    );
    if !report.notes.is_empty() {
        out.push('\n');
        for note in &report.notes {
            let _ = writeln!(out, "- {note}");
        }
    }
    out
}

#[derive(Default)]
struct Footnotes {
    texts: Vec<String>,
}

impl Footnotes {
    /// The 1-based number of `text`, adding it if new.
    fn number(&mut self, text: &str) -> usize {
        if let Some(i) = self.texts.iter().position(|t| t == text) {
            return i + 1;
        }
        self.texts.push(text.to_owned());
        self.texts.len()
    }
}

/// How many leading systems later columns are compared with: 2 when the first two are
/// Downbeat (over two transports), else 1.
fn baselines(report: &RunReport) -> usize {
    let downbeat = |i: usize| report.systems.get(i).is_some_and(|s| s.system.starts_with("downbeat"));
    if downbeat(0) && downbeat(1) { 2 } else { 1 }
}

/// Metric keys in table order: the first system's, then any new ones of later systems.
fn row_keys(report: &RunReport) -> Vec<&str> {
    let mut keys: Vec<&str> = Vec::new();
    for metric in report.systems.iter().flat_map(|s| &s.metrics) {
        if !keys.contains(&metric.key.as_str()) {
            keys.push(&metric.key);
        }
    }
    keys
}

/// `clients=30, seconds=120, ...` from a JSON object (strings unquoted); a non-object
/// value as its JSON; nothing for null.
fn parameters_line(parameters: &serde_json::Value) -> String {
    match parameters {
        serde_json::Value::Null => String::new(),
        serde_json::Value::Object(map) => map
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

/// Text safe inside a table cell.
fn cell_text(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// The ratio cell: see [`markdown`].
fn ratio(downbeat: Option<f64>, peer: Option<f64>, better: Better) -> String {
    let (Some(d), Some(p)) = (downbeat, peer) else { return "n/a".into() };
    if !d.is_finite() || !p.is_finite() || d < 0.0 || p < 0.0 {
        return "n/a".into();
    }
    let (numerator, divisor) = match better {
        Better::Lower => (p, d),
        Better::Higher => (d, p),
    };
    if divisor == 0.0 {
        return if numerator == 0.0 { "both 0".into() } else { "∞".into() };
    }
    format!("×{}", format_ratio(numerator / divisor))
}

/// 2–3 significant digits: `1.0`, `2.4`, `12.3`, `157`, `0.42`, `0.071`.
fn format_ratio(r: f64) -> String {
    if r >= 99.95 {
        format!("{r:.0}")
    } else if r >= 0.995 {
        format!("{r:.1}")
    } else if r > 0.0 {
        let decimals = (1 - r.log10().floor() as i32).clamp(2, 9) as usize;
        format!("{r:.decimals$}")
    } else {
        "0".into()
    }
}

/// A figure with 3 significant digits, trailing zeros dropped (`1.5`, `0.0123`, `457`);
/// from 1000 on a whole number with thousands separated by commas (`12,346`), never an
/// exponent.
fn format_value(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "∞".into() } else { "-∞".into() };
    }
    if v == 0.0 {
        return "0".into();
    }
    let sign = if v < 0.0 { "-" } else { "" };
    let a = v.abs();
    // Round to 3 significant digits first, so 9.996 becomes 10.0 rather than 10.00.
    let magnitude = a.log10().floor() as i32;
    let rounded = if magnitude >= 3 { a.round() } else { round_sig(a, 3) };
    if rounded >= 1000.0 {
        return format!("{sign}{}", group_thousands(rounded));
    }
    let magnitude = rounded.log10().floor() as i32;
    let decimals = (2 - magnitude).clamp(0, 12) as usize;
    let mut text = format!("{rounded:.decimals$}");
    if text.contains('.') {
        text.truncate(text.trim_end_matches('0').trim_end_matches('.').len());
    }
    format!("{sign}{text}")
}

fn round_sig(a: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits - 1 - a.log10().floor() as i32);
    (a * scale).round() / scale
}

fn group_thousands(whole: f64) -> String {
    let digits = format!("{whole:.0}");
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// JSON

/// Writes the report pretty-printed to `<dir>/<scenario>-<profile>.json`, creating `dir`,
/// and returns the path. Characters other than ASCII letters, digits, `-`, `_` and `.` in
/// the names become `_`.
pub fn write_json(report: &RunReport, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}.json", file_stem(report)));
    let mut text = serde_json::to_string_pretty(report).context("serializing the report")?;
    text.push('\n');
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `<scenario>-<profile>`, with `-<n>rooms` when a run had more than one room (so the
/// one-class comparison and a many-room run of the same scenario keep their own files).
fn file_stem(report: &RunReport) -> String {
    let rooms = report.parameters.get("rooms").and_then(serde_json::Value::as_u64).unwrap_or(1);
    let suffix = if rooms > 1 { format!("-{rooms}rooms") } else { String::new() };
    format!("{}-{}{suffix}", safe_name(&report.scenario), safe_name(&report.profile))
}

fn safe_name(name: &str) -> String {
    let name: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    if name.is_empty() || name.chars().all(|c| c == '.') { "_".into() } else { name }
}

// ---------------------------------------------------------------------------------------------
// CDF plots

/// Image size of [`plot_cdfs`], pixels.
const PLOT_SIZE: (u32, u32) = (900, 560);

/// Most points drawn per line; longer series are drawn through this many quantiles.
const MAX_PLOT_POINTS: usize = 2000;

/// Line colours, one per system in report order (Tableau 10; Downbeat blue).
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// TrueType fonts tried in turn for the plots' text: Debian's fonts-dejavu-core first.
const FONT_PATHS: [&str; 7] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/opentype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Plots the empirical CDF of `distributions[key]` of every system that has samples there
/// to `<dir>/<scenario>-<profile>-<key>.png` (900×560, creating `dir`), one line per system
/// with its display name in the legend. `None` when no system has samples for `key`.
///
/// The x axis is the value in `unit` on a log scale; the y axis the fraction of samples at
/// or below it. A log axis cannot show 0 or less, so such samples (a spread of exactly 0)
/// are drawn at a floor of half the smallest positive sample of all systems (0.001 when no
/// sample is positive), which the axis label states. NaNs and infinities are left out.
///
/// Text needs a TrueType font from the system (Debian's fonts-dejavu-core, else Liberation
/// or Noto Sans); without one this fails naming the package to install.
pub fn plot_cdfs(report: &RunReport, key: &str, title: &str, unit: &str, dir: &Path) -> Result<Option<PathBuf>> {
    let series: Vec<(usize, &str, Vec<f64>)> = report
        .systems
        .iter()
        .enumerate()
        .filter_map(|(i, system)| {
            let mut samples: Vec<f64> =
                system.distributions.get(key)?.iter().copied().filter(|x| x.is_finite()).collect();
            if samples.is_empty() {
                return None;
            }
            samples.sort_by(f64::total_cmp);
            Some((i, system.display.as_str(), samples))
        })
        .collect();
    if series.is_empty() {
        return Ok(None);
    }
    register_fonts()?;

    let min_positive = series.iter().flat_map(|(_, _, s)| s.iter().copied()).filter(|&x| x > 0.0).reduce(f64::min);
    let floor = min_positive.map_or(0.001, |m| m / 2.0);
    let clamped_any = series.iter().any(|(_, _, s)| s.first().is_some_and(|&x| x <= 0.0));
    let max = series.iter().filter_map(|(_, _, s)| s.last().copied()).fold(floor, f64::max);
    // Some room on both sides; a single value still gets a visible decade.
    let x_range = (floor / 1.5)..(max * 1.5).max(floor * 10.0);

    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}-{}.png", file_stem(report), safe_name(key)));
    let x_desc = match (unit.is_empty(), clamped_any) {
        (true, false) => "value (log scale)".to_owned(),
        (false, false) => format!("{unit} (log scale)"),
        (true, true) => format!("value (log scale; values ≤ 0 drawn at {})", format_value(floor)),
        (false, true) => format!("{unit} (log scale; values ≤ 0 drawn at {} {unit})", format_value(floor)),
    };

    let draw = || -> Result<()> {
        let root = BitMapBackend::new(&path, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(56)
            .build_cartesian_2d(x_range.clone().log_scale(), 0f64..1f64)
            .map_err(plot_error)?;
        let mut mesh = chart.configure_mesh();
        mesh.x_desc(x_desc.as_str())
            .y_desc("fraction of samples ≤ x")
            .x_label_formatter(&|x| format_value(*x))
            .y_label_formatter(&|y| format!("{y:.1}"))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(200, 200, 200));
        mesh.draw().map_err(plot_error)?;
        for (i, name, samples) in &series {
            let colour = COLOURS[i % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(cdf_points(samples, floor), colour.stroke_width(2)))
                .map_err(plot_error)?
                .label(format!("{name} (n={})", samples.len()))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3)));
        }
        finish(&root, &mut chart, SeriesLabelPosition::LowerRight)?;
        Ok(())
    };
    draw().with_context(|| format!("plotting {}", path.display()))?;
    Ok(Some(path))
}

/// One line of [`plot_xy`]: its legend and its points, in x order.
pub type XySeries = (String, Vec<(f64, f64)>);

/// Plots `series` as lines with their points marked to `<dir>/<scenario>-<profile>-<key>.png`
/// (900×560, creating `dir`) on linear axes from 0, labelled `(x, y)`. `None` when no series
/// has a point. Text needs a TrueType font, as [`plot_cdfs`].
pub fn plot_xy(
    report: &RunReport,
    key: &str,
    title: &str,
    (x_label, y_label): (&str, &str),
    series: &[XySeries],
    dir: &Path,
) -> Result<Option<PathBuf>> {
    let finite = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite();
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).filter(finite).collect();
    if all.is_empty() {
        return Ok(None);
    }
    register_fonts()?;
    let x_max = all.iter().map(|p| p.0).fold(0.0f64, f64::max).max(1.0) * 1.08;
    let y_max = all.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.12;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{}-{}.png", file_stem(report), safe_name(key)));
    let draw = || -> Result<()> {
        let root = BitMapBackend::new(&path, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(plot_error)?;
        let mut mesh = chart.configure_mesh();
        mesh.x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(&|x| format_value(*x))
            .y_label_formatter(&|y| format_value(*y))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .light_line_style(RGBColor(235, 235, 235))
            .bold_line_style(RGBColor(200, 200, 200));
        mesh.draw().map_err(plot_error)?;
        for (i, (name, points)) in series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let points: Vec<(f64, f64)> = points.iter().copied().filter(finite).collect();
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
                .map_err(plot_error)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3)));
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled()))).map_err(plot_error)?;
        }
        finish(&root, &mut chart, SeriesLabelPosition::UpperLeft)?;
        Ok(())
    };
    draw().with_context(|| format!("plotting {}", path.display()))?;
    Ok(Some(path))
}

/// Draws the legend of `chart` at `position` and writes `root` out.
fn finish<'a, DB, CT>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(position)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)
}

/// The points of an empirical CDF of `sorted` samples as a step line, values clamped up to
/// `floor`; through [`MAX_PLOT_POINTS`] quantiles when there are more samples.
fn cdf_points(sorted: &[f64], floor: f64) -> Vec<(f64, f64)> {
    let n = sorted.len();
    if n <= MAX_PLOT_POINTS / 2 {
        let mut points = Vec::with_capacity(2 * n);
        for (i, &x) in sorted.iter().enumerate() {
            let x = x.max(floor);
            points.push((x, i as f64 / n as f64));
            points.push((x, (i + 1) as f64 / n as f64));
        }
        points
    } else {
        (0..=MAX_PLOT_POINTS)
            .map(|k| {
                let q = k as f64 / MAX_PLOT_POINTS as f64;
                let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
                (sorted[i].max(floor), q)
            })
            .collect()
    }
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{e}")
}

/// Loads the first font of [`FONT_PATHS`] there is and registers it with plotters, once per
/// process (plotters keeps `&'static` font data, so the bytes are leaked once).
fn register_fonts() -> Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = REGISTERED.get_or_init(|| {
        let Some((path, bytes)) = FONT_PATHS.iter().find_map(|p| Some((*p, std::fs::read(p).ok()?))) else {
            return Err(format!(
                "no TrueType font for the plots' text (looked for {}); install Debian's fonts-dejavu-core \
                 (apt-get install fonts-dejavu-core)",
                FONT_PATHS.join(", ")
            ));
        };
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        for family in ["sans-serif", "serif", "monospace"] {
            plotters::style::register_font(family, FontStyle::Normal, bytes)
                .map_err(|_| format!("{path} is not a font plotters can read"))?;
        }
        Ok(())
    });
    match result {
        Ok(()) => Ok(()),
        Err(e) => bail!("{e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Progress

/// How often a plain progress line is printed when stderr is no terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// Progress of a long step: a bar on stderr when it is a terminal; otherwise (or when `CI`
/// is set) a plain `label: pos/len message` line at most every 10 s and one at the end.
/// Methods take `&self`, so threads may share one.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    plain: Mutex<Plain>,
}

#[derive(Debug)]
struct Plain {
    label: String,
    len: u64,
    pos: u64,
    message: String,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    /// Progress over `len` steps, shown as `label`.
    pub fn new(len: u64, label: &str) -> Self {
        let fancy = std::io::stderr().is_terminal() && std::env::var_os("CI").is_none();
        let bar = fancy.then(|| {
            let style = ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
                .with_style(style)
                .with_prefix(label.to_owned())
        });
        let now = Instant::now();
        let plain =
            Plain { label: label.to_owned(), len, pos: 0, message: String::new(), started: now, last_line: now };
        Self { bar, plain: Mutex::new(plain) }
    }

    /// Advances by `n` steps.
    pub fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
            return;
        }
        let mut plain = self.plain.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        plain.pos = plain.pos.saturating_add(n);
        if plain.last_line.elapsed() >= PLAIN_EVERY {
            plain.last_line = Instant::now();
            eprintln!("{}", plain.line());
        }
    }

    /// Shows `message` after the count.
    pub fn set_message(&self, message: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(message.to_owned());
            return;
        }
        self.plain.lock().unwrap_or_else(std::sync::PoisonError::into_inner).message = message.to_owned();
    }

    /// Ends the bar, leaving it on screen (or prints a final plain line).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
            return;
        }
        let plain = self.plain.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        eprintln!("{} (done in {:.1} s)", plain.line(), plain.started.elapsed().as_secs_f64());
    }
}

impl Plain {
    fn line(&self) -> String {
        let mut line = format!("{}: {}/{}", self.label, self.pos, self.len);
        if !self.message.is_empty() {
            line.push(' ');
            line.push_str(&self.message);
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Machine, SystemResult};

    fn system(system: &str, display: &str, metrics: Vec<Metric>) -> SystemResult {
        SystemResult { system: system.into(), display: display.into(), metrics, ..SystemResult::default() }
    }

    fn sample_report() -> RunReport {
        let mut downbeat = system(
            "downbeat",
            "Downbeat",
            vec![
                Metric::lower("onset_spread_p99_ms", "beat onset spread p99", "ms", 1.234),
                Metric::higher("capacity_clients", "clients per core", "", 12345.6),
                Metric::lower("late_beats", "late beats", "%", 0.0),
                Metric::not_applicable("reconnect_ms", "reconnect time", "ms", Better::Lower, "no reconnect ran"),
            ],
        );
        downbeat.distributions.insert("onset_spread_ms".into(), vec![0.0, 0.5, 1.0, 1.2, 2.5, 0.8]);
        let mut socketio = system(
            "socketio",
            "Socket.IO",
            vec![
                Metric::lower("onset_spread_p99_ms", "beat onset spread p99", "ms", 45.6),
                Metric::higher("capacity_clients", "clients per core", "", 1000.0),
                Metric::lower("late_beats", "late beats", "%", 3.0),
                Metric::lower("reconnect_ms", "reconnect time", "ms", 250.0),
                Metric::lower("memory_kib", "memory per client", "KiB", 48.0).with_note("RSS of the node process"),
            ],
        );
        socketio.distributions.insert("onset_spread_ms".into(), (1..=3000).map(|i| f64::from(i) / 50.0).collect());
        let ws = system(
            "ws",
            "WebSocket timer",
            vec![
                Metric::lower("onset_spread_p99_ms", "beat onset spread p99", "ms", 0.617),
                Metric::higher("capacity_clients", "clients per core", "", 24691.2),
                Metric::not_applicable("late_beats", "late beats", "%", Better::Lower, "no beat schedule"),
            ],
        );
        RunReport {
            scenario: "onset".into(),
            title: "Beat onset spread".into(),
            profile: "classroom-wifi".into(),
            profile_parameters: "RTT 20 ms ± 8 ms, loss 1 %".into(),
            parameters: serde_json::json!({ "clients": 30, "seconds": 120, "mode": "steady" }),
            command: "downbeat-bench onset --profile classroom-wifi".into(),
            started_at: "2025-01-01T00:00:00Z".into(),
            wall_seconds: 125.25,
            machine: Machine {
                cpus: 2,
                cpu_model: "Test CPU".into(),
                memory_gib: 24.0,
                kernel: "6.1.0".into(),
                steal_percent: 0.42,
                load_average: 1.5,
            },
            systems: vec![downbeat, socketio, ws],
            notes: vec!["noisy neighbour".into()],
        }
    }

    #[test]
    fn markdown_table_ratios_and_footnotes() {
        let md = markdown(&sample_report());
        println!("{md}");
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "### Beat onset spread — profile `classroom-wifi` (clients=30, mode=steady, seconds=120)");
        assert!(md.contains(
            "| metric | Downbeat | Socket.IO | ratio | WebSocket timer | ratio |\n|:--|--:|--:|--:|--:|--:|\n"
        ));
        // Lower is better: Socket.IO's 45.6 against 1.234 is ×37 in Downbeat's favour; the
        // WebSocket timer's 0.617 is half, so ×0.50.
        assert!(md.contains("| beat onset spread p99 (ms) | 1.23 | 45.6 | ×37.0 | 0.617 | ×0.50 |"), "{md}");
        // Higher is better: 12345.6 over 1000 is ×12.3; over 24691.2 is ×0.50.
        assert!(md.contains("| clients per core | 12,346 | 1,000 | ×12.3 | 24,691 | ×0.50 |"), "{md}");
        // Downbeat 0 where the peer has 3: ∞; missing value: n/a with a footnote.
        assert!(md.contains("| late beats (%) | 0 | 3 | ∞ | n/a [1] | n/a |"), "{md}");
        assert!(md.contains("| reconnect time (ms) | n/a [2] | 250 | n/a | n/a | n/a |"), "{md}");
        // A key only a peer has comes last; its note is a footnote on a present value.
        assert!(md.contains("| memory per client (KiB) | n/a | 48 [3] | n/a | n/a | n/a |"), "{md}");
        assert!(md.contains("- [1] no beat schedule\n- [2] no reconnect ran\n- [3] RSS of the node process\n"));
        assert!(
            md.contains("Profile `classroom-wifi`: RTT 20 ms ± 8 ms, loss 1 %. Machine: 2 CPUs (Test CPU), 24.0 GiB")
        );
        assert!(md.contains("steal 0.4 %, load 1.50. Wall time 125.2 s"));
        assert!(md.contains("Command: `downbeat-bench onset --profile classroom-wifi`"));
        assert!(md.trim_end().ends_with("- noisy neighbour"));
    }

    #[test]
    fn markdown_two_transports_give_peers_two_ratios() {
        let mut report = sample_report();
        // Downbeat's first two metrics, at twice the spread and half the clients.
        let mut websocket =
            system("downbeat-websocket", "Downbeat (WebSocket)", report.systems[0].metrics[..2].to_vec());
        websocket.metrics[0].value = Some(2.468);
        websocket.metrics[1].value = Some(6172.8);
        report.systems.insert(1, websocket);
        let md = markdown(&report);
        assert!(
            md.contains(
                "| metric | Downbeat | Downbeat (WebSocket) | ratio | Socket.IO | ratio | WebSocket timer | ratio |"
            ),
            "{md}"
        );
        // The WebSocket column against the first; each peer against both.
        assert!(
            md.contains(
                "| beat onset spread p99 (ms) | 1.23 | 2.47 | ×2.0 | 45.6 | ×37.0 · ×18.5 | 0.617 | ×0.50 · ×0.25 |"
            ),
            "{md}"
        );
        assert!(md.contains("| late beats (%) | 0 | n/a | n/a | 3 | ∞ · n/a | n/a [1] | n/a · n/a |"), "{md}");
        assert!(md.contains("two ratios: against Downbeat · against Downbeat (WebSocket)."), "{md}");
    }

    #[test]
    fn markdown_single_system_has_no_ratio_columns() {
        let mut report = sample_report();
        report.systems.truncate(1);
        let md = markdown(&report);
        assert!(md.contains("| metric | Downbeat |\n|:--|--:|\n"), "{md}");
        assert!(md.contains("| beat onset spread p99 (ms) | 1.23 |\n"), "{md}");
        assert!(!md.contains("ratio"));
    }

    #[test]
    fn ratio_orientation_and_edges() {
        assert_eq!(ratio(Some(2.0), Some(20.0), Better::Lower), "×10.0");
        assert_eq!(ratio(Some(20.0), Some(2.0), Better::Higher), "×10.0");
        assert_eq!(ratio(Some(2.0), Some(2.0), Better::Lower), "×1.0");
        assert_eq!(ratio(Some(10.0), Some(1.0), Better::Lower), "×0.10");
        assert_eq!(ratio(Some(1000.0), Some(1.0), Better::Lower), "×0.0010");
        assert_eq!(ratio(Some(1.0), Some(1234.0), Better::Lower), "×1234");
        assert_eq!(ratio(Some(0.0), Some(0.0), Better::Lower), "both 0");
        assert_eq!(ratio(Some(5.0), Some(0.0), Better::Higher), "∞");
        assert_eq!(ratio(Some(0.0), Some(5.0), Better::Higher), "×0");
        assert_eq!(ratio(None, Some(5.0), Better::Lower), "n/a");
        assert_eq!(ratio(Some(-1.0), Some(5.0), Better::Lower), "n/a");
        assert_eq!(ratio(Some(f64::NAN), Some(5.0), Better::Lower), "n/a");
    }

    #[test]
    fn values_have_three_significant_digits() {
        let cases = [
            (0.0, "0"),
            (1.0, "1"),
            (1.5, "1.5"),
            (1.234, "1.23"),
            (9.996, "10"),
            (12.34, "12.3"),
            (123.4, "123"),
            (999.6, "1,000"),
            (1234.4, "1,234"),
            (1234567.0, "1,234,567"),
            (0.012345, "0.0123"),
            (0.5, "0.5"),
            (-2.345, "-2.35"),
            (f64::INFINITY, "∞"),
        ];
        for (v, want) in cases {
            assert_eq!(format_value(v), want, "{v}");
        }
    }

    #[test]
    fn json_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = sample_report();
        let path = write_json(&report, &dir.path().join("results")).expect("write");
        assert_eq!(path, dir.path().join("results/onset-classroom-wifi.json"));
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains("\n  \"scenario\": \"onset\""), "pretty-printed");
        let back: RunReport = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, report);
    }

    #[test]
    fn names_are_safe_in_paths() {
        assert_eq!(safe_name("../etc/passwd"), ".._etc_passwd");
        assert_eq!(safe_name(".."), "_");
        assert_eq!(safe_name("classroom-wifi"), "classroom-wifi");
    }

    #[test]
    fn cdf_plot_is_a_png() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = sample_report();
        let path = plot_cdfs(&report, "onset_spread_ms", "Beat onset spread", "ms", dir.path())
            .expect("plot")
            .expect("some system has data");
        assert_eq!(path, dir.path().join("onset-classroom-wifi-onset_spread_ms.png"));
        let bytes = std::fs::read(&path).expect("read png");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(bytes.len() > 10_000, "{} bytes", bytes.len());
        assert_eq!(plot_cdfs(&report, "fanout_ms", "Fan-out", "ms", dir.path()).expect("no data"), None);
    }

    #[test]
    fn cdf_points_step_and_decimate() {
        let points = cdf_points(&[0.0, 1.0], 0.25);
        assert_eq!(points, vec![(0.25, 0.0), (0.25, 0.5), (1.0, 0.5), (1.0, 1.0)]);
        let many: Vec<f64> = (1..=100_000).map(f64::from).collect();
        let points = cdf_points(&many, 0.5);
        assert_eq!(points.len(), MAX_PLOT_POINTS + 1);
        assert_eq!(points[0], (1.0, 0.0));
        assert_eq!(points[MAX_PLOT_POINTS], (100_000.0, 1.0));
    }

    #[test]
    fn plain_progress_counts() {
        let progress = Progress::new(10, "test");
        progress.inc(3);
        progress.set_message("warming up");
        progress.inc(2);
        if progress.bar.is_none() {
            let plain = progress.plain.lock().expect("lock");
            assert_eq!(plain.line(), "test: 5/10 warming up");
        }
        progress.finish();
    }
}
