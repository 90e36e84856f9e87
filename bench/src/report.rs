//! The table (terminal and BENCHMARKS.md) and the plot (PNG).

use crate::config::{Config, Kind};
use crate::results::{median, summary, Results, Row, Show};
use anyhow::{Context, Result};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::fmt::Write as _;
use std::path::Path;

const VENUS_LIMIT_MIB: f64 = 100.0;

fn fmt_time(s: f64) -> String {
    if s >= 10.0 {
        format!("{s:.1} s")
    } else if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 0.01 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{:.1} ms", s * 1e3)
    }
}

fn fmt_us(us: f64) -> String {
    if us >= 100.0 {
        format!("{us:.0}")
    } else {
        format!("{us:.1}")
    }
}

/// "median [min-max] unit" of one cell.
fn cell(show: Show, v: &[f64]) -> String {
    let (med, lo, hi) = summary(v);
    match show {
        Show::Time => format!("{} [{}–{}]", fmt_time(med), fmt_time(lo), fmt_time(hi)),
        // A shorter time is a higher rate: min and max swap.
        Show::Rate { mib } => format!("{:.0} MiB/s [{:.0}–{:.0}]", mib / med, mib / hi, mib / lo),
        Show::PerOp { n } => {
            format!("{} µs/op [{}–{}]", fmt_us(med / n * 1e6), fmt_us(lo / n * 1e6), fmt_us(hi / n * 1e6))
        }
    }
}

/// Median time of `kind` relative to local disk's (1.0 = as fast).
pub fn ratio(row: &Row, kind: Kind) -> Option<f64> {
    let local = median(row.values.get(&Kind::Local)?)?;
    let mine = median(row.values.get(&kind)?)?;
    (local > 0.0).then_some(mine / local)
}

fn ratio_between(row_a: Option<&Row>, a: Kind, row_b: Option<&Row>, b: Kind) -> Option<f64> {
    let x = median(row_a?.values.get(&a)?)?;
    let y = median(row_b?.values.get(&b)?)?;
    (x > 0.0).then_some(y / x)
}

/// The main table: one row per figure, one column per system.
pub fn table(cfg: &Config, res: &Results) -> String {
    let mut s = String::new();
    let _ = write!(s, "| workload |");
    for k in &cfg.systems {
        let _ = write!(s, " {} |", k.title());
    }
    let _ = write!(s, "\n|---|");
    for _ in &cfg.systems {
        let _ = write!(s, "---|");
    }
    s.push('\n');
    for row in res.sorted_rows() {
        let _ = write!(s, "| {} |", row.label);
        for &k in &cfg.systems {
            match row.values.get(&k) {
                Some(v) if !v.is_empty() => {
                    let r = match (k, ratio(row, k)) {
                        (Kind::Local, _) | (_, None) => String::new(),
                        (_, Some(r)) => format!(" **{r:.2}×**"),
                    };
                    let _ = write!(s, " {}{} |", cell(row.show, v), r);
                }
                _ => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    if cfg.wants(8) && cfg.systems.contains(&Kind::Afs) && res.find((8, 0)).is_none() {
        let _ = write!(s, "| 8. reintegration of {} logged operations |", cfg.reint_ops / 2 * 2);
        for &k in &cfg.systems {
            s.push_str(if k == Kind::Afs { " n/a (failed, see below) |" } else { " – |" });
        }
        s.push('\n');
    }
    s
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Workload 5's RPC counts, peak memory and workload 7.
pub fn extras(cfg: &Config, res: &Results) -> String {
    let mut s = String::new();
    if let Some(r) = res.rpcs_per_open {
        let _ = writeln!(s, "RPCs per warm open+stat+close (workload 5): **{r:.3}** with the kernel's caches warm, ");
        if let Some(d) = res.rpcs_per_open_after_drop {
            let _ = writeln!(
                s,
                "**{d:.3}** right after `drop_caches` (the kernel forgot its dentries and inodes, so venus answered \
                 every lookup itself).\n"
            );
        }
    }
    if let Some(r) = ratio_between(res.find((8, 1)), Kind::Afs, res.find((8, 0)), Kind::Afs) {
        let _ = writeln!(
            s,
            "Reintegration (workload 8) takes **{r:.2}×** the time of doing the same operations connected.\n"
        );
    }
    if !res.andrew_steal.is_empty() {
        let per_kind: Vec<String> = res
            .andrew_steal
            .iter()
            .map(|(k, v)| {
                let (med, lo, hi) = summary(v);
                format!("{} {:.0}% [{:.0}–{:.0}%]", k.title(), med * 100.0, lo * 100.0, hi * 100.0)
            })
            .collect();
        let _ = writeln!(
            s,
            "Host steal during the Andrew passes (the share of this machine's CPU time its host ran something \
             else instead; median [min–max] over the passes): {}. A quiet host takes a few percent; at 30-35% \
             a warm pass's Copy phase was seen to take 2-3 times as long as in a quiet minute.\n",
            per_kind.join(", ")
        );
    }
    if !res.workload_steal.is_empty() {
        s.push_str(&steal_table(cfg, res));
    }
    if !res.memory.is_empty() {
        let _ = writeln!(s, "Peak memory (VmHWM, reset before each workload):\n");
        let _ = writeln!(s, "| during | venus | afsd |\n|---|---|---|");
        for (w, m) in &res.memory {
            let name = match w {
                2 => "2. warm read",
                3 => "3. cold fetch",
                4 => "4. write-back",
                _ => "?",
            };
            let _ = writeln!(s, "| {name} | {:.1} MiB | {:.1} MiB |", mib(m.venus_kib), mib(m.afsd_kib));
        }
        s.push('\n');
    }
    if !res.scale.is_empty() {
        let _ = writeln!(
            s,
            "Server scale (workload 7, afs only): simulated clients through the RPC library, no FUSE, each \
             alternating a fetch of a shared 4 KiB file and a store of its own 4 KiB file for {} s per run; \
             clients and afsd share the machine's {} cores.\n",
            cfg.scale_secs,
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
        );
        let _ = writeln!(s, "| clients | operations/s | per client |\n|---|---|---|");
        for (n, v) in &res.scale {
            let (med, lo, hi) = summary(v);
            let _ = writeln!(s, "| {n} | {med:.0} [{lo:.0}–{hi:.0}] | {:.0} |", med / *n as f64);
        }
        s.push('\n');
    }
    if !res.break_all.is_empty() {
        let (med, lo, hi) = summary(&res.break_all);
        let (smed, _, _) = summary(&res.break_store);
        let _ = writeln!(
            s,
            "Callback break: a store of a file that {} other clients hold reaches all of them in **{}** \
             [{}–{}]; the store itself returns after {} (afsd answers a change only once holders acknowledged \
             the break).\n",
            res.break_holders,
            fmt_time(med),
            fmt_time(lo),
            fmt_time(hi),
            fmt_time(smed)
        );
    }
    s
}

/// The targets, measured.
pub fn targets(res: &Results) -> String {
    let mut s = String::from("| target | measured | met |\n|---|---|---|\n");
    let yes = |b: bool| if b { "yes" } else { "**no**" };
    let warm = res.find((1, 15));
    if let Some(r) = warm.and_then(|w| ratio(w, Kind::Afs)) {
        let _ = writeln!(s, "| Andrew total, warm, within 1.3× local disk | {r:.2}× | {} |", yes(r <= 1.3));
    }
    if let Some(w) = warm {
        let mine = w.values.get(&Kind::Afs).and_then(|v| median(v));
        for peer in [Kind::Sshfs, Kind::Rclone] {
            if let (Some(m), Some(p)) = (mine, w.values.get(&peer).and_then(|v| median(v))) {
                let _ = writeln!(
                    s,
                    "| Andrew total, warm, ahead of {} | {} vs {} | {} |",
                    peer.key(),
                    fmt_time(m),
                    fmt_time(p),
                    yes(m < p)
                );
            }
        }
    }
    if let Some(r) = ratio_between(res.find((2, 0)), Kind::Afs, res.find((2, 1)), Kind::Afs) {
        let _ = writeln!(s, "| warm read ≥ 0.9× the container file | {r:.2}× | {} |", yes(r >= 0.9));
    }
    if let Some(r) = ratio_between(res.find((3, 0)), Kind::Afs, res.find((3, 1)), Kind::Afs) {
        let _ = writeln!(s, "| cold fetch ≥ 0.8× raw TCP | {r:.2}× | {} |", yes(r >= 0.8));
    }
    if let Some(r) = res.rpcs_per_open {
        let d = res.rpcs_per_open_after_drop.unwrap_or(0.0);
        let _ = writeln!(
            s,
            "| 0 RPCs per warm open | {r:.3} (after drop_caches: {d:.3}) | {} |",
            yes(r == 0.0 && d == 0.0)
        );
    }
    let peak = res.memory.values().map(|m| m.venus_kib).max();
    if let Some(p) = peak {
        let _ = writeln!(
            s,
            "| venus < 100 MiB during large transfers | {:.1} MiB | {} |",
            mib(p),
            yes(mib(p) < VENUS_LIMIT_MIB)
        );
    }
    s
}

// ---- the plot ----------------------------------------------------------------

fn load_font() -> Result<()> {
    let candidates = [
        std::env::var("BENCH_FONT").unwrap_or_default(),
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into(),
        "/usr/share/fonts/TTF/DejaVuSans.ttf".into(),
        "/usr/share/fonts/dejavu/DejaVuSans.ttf".into(),
    ];
    let path = candidates
        .iter()
        .find(|p| !p.is_empty() && Path::new(p).exists())
        .context("no DejaVuSans.ttf (apt-get install fonts-dejavu-core, or set BENCH_FONT)")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))?;
    Ok(())
}

fn color(kind: Kind) -> RGBColor {
    match kind {
        Kind::Local => RGBColor(90, 90, 90),
        Kind::Afs => RGBColor(31, 119, 180),
        Kind::Sshfs => RGBColor(255, 127, 14),
        Kind::Rclone => RGBColor(44, 160, 44),
    }
}

type PlotResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

pub fn plot(cfg: &Config, res: &Results, path: &Path, subtitle: &str) -> Result<()> {
    load_font()?;
    let (w, h) = (1400u32, 1000u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    draw(cfg, res, &mut buf, (w, h), subtitle).map_err(|e| anyhow::anyhow!("drawing the plot: {e}"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(&buf)?;
    writer.finish()?;
    Ok(())
}

fn draw(cfg: &Config, res: &Results, buf: &mut [u8], size: (u32, u32), subtitle: &str) -> PlotResult<()> {
    let root = BitMapBackend::with_buffer(buf, size).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(640);

    // Top: every plotted figure as time relative to local disk, log scale.
    let rows: Vec<&Row> = res.sorted_rows().into_iter().filter(|r| r.plot.is_some()).collect();
    let peers: Vec<Kind> = cfg.systems.iter().copied().filter(|k| *k != Kind::Local).collect();
    let slots = peers.len().max(1) + 1;
    let mut bars = Vec::new();
    for (g, row) in rows.iter().enumerate() {
        for (i, &k) in peers.iter().enumerate() {
            if let Some(r) = ratio(row, k) {
                bars.push((g * slots + i, k, r));
            }
        }
    }
    let lo = bars.iter().map(|b| b.2).fold(1.0f64, f64::min) / 1.6;
    let hi = bars.iter().map(|b| b.2).fold(1.0f64, f64::max) * 2.0;
    let n = (rows.len() * slots).max(1);
    let names: Vec<String> = rows.iter().map(|r| r.plot.clone().unwrap_or_default()).collect();
    let mid = (slots - 1) / 2;
    let mut chart = ChartBuilder::on(&top)
        .caption(format!("afs vs local disk, sshfs, rclone — {subtitle}"), ("sans-serif", 26))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d((0..n).into_segmented(), (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(s) if s % slots == mid => names.get(s / slots).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc("median time relative to local disk (log scale; lower is better)")
        .y_label_formatter(&|v| if *v >= 10.0 { format!("{v:.0}×") } else { format!("{v:.1}×") })
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for &k in &peers {
        let c = color(k);
        chart
            .draw_series(bars.iter().filter(|b| b.1 == k).map(|&(s, _, r)| {
                Rectangle::new([(SegmentValue::Exact(s), lo), (SegmentValue::Exact(s + 1), r)], c.filled())
            }))?
            .label(k.title())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
        let style = TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
        chart.draw_series(bars.iter().filter(|b| b.1 == k).map(|&(s, _, r)| {
            let text = if r >= 10.0 { format!("{r:.0}×") } else { format!("{r:.2}×") };
            Text::new(text, (SegmentValue::CenterOf(s), r * 1.03), style.clone())
        }))?;
    }
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(SegmentValue::Exact(0), 1.0), (SegmentValue::Exact(n), 1.0)],
            BLACK.stroke_width(2),
        )))?
        .label("local disk = 1.0")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    // Bottom: server scale.
    let pts: Vec<(f64, f64)> = res.scale.iter().map(|(n, v)| (*n as f64, summary(v).0)).collect();
    let ymax = res.scale.iter().flat_map(|(_, v)| v.iter().copied()).fold(1.0f64, f64::max) * 1.25;
    let xmax = pts.iter().map(|p| p.0).fold(1.0f64, f64::max) * 1.08;
    let caption = match median(&res.break_all) {
        Some(b) => format!(
            "7. afs server scale: fetch+store ops/s (median, min–max) — break reaches {} holders in {}",
            res.break_holders,
            fmt_time(b)
        ),
        None => "7. afs server scale: fetch+store operations per second".to_string(),
    };
    let mut chart = ChartBuilder::on(&bottom)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("simulated clients")
        .y_desc("operations / s")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    let c = color(Kind::Afs);
    chart.draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(3)))?;
    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 5, c.filled())))?;
    for (n, v) in &res.scale {
        let (_, lo, hi) = summary(v);
        let x = *n as f64;
        chart.draw_series(std::iter::once(PathElement::new(vec![(x, lo), (x, hi)], c.stroke_width(2))))?;
    }
    let style = TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(pts.iter().map(|&(x, y)| Text::new(format!("{y:.0}"), (x, y + ymax * 0.03), style.clone())))?;
    root.present()?;
    Ok(())
}

/// The host's steal over each whole workload, one column per system: a
/// figure far from its neighbours was taken while the host was busy.
fn steal_table(cfg: &Config, res: &Results) -> String {
    let mut s = String::from(
        "Host steal over each whole workload (afs's workload 1 includes local disk's passes made between its \
         own):\n\n| workload |",
    );
    let kinds: Vec<Kind> =
        cfg.systems.iter().copied().filter(|k| res.workload_steal.keys().any(|(_, k2)| k2 == k)).collect();
    for k in &kinds {
        let _ = write!(s, " {} |", k.title());
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(kinds.len()));
    s.push('\n');
    let workloads: std::collections::BTreeSet<u32> = res.workload_steal.keys().map(|(w, _)| *w).collect();
    for w in workloads {
        let _ = write!(s, "| {w}. {} |", crate::workloads::name(w));
        for k in &kinds {
            match res.workload_steal.get(&(w, *k)) {
                Some(st) => {
                    let _ = write!(s, " {:.0}% |", st * 100.0);
                }
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    s.push('\n');
    s
}
