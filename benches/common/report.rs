//! Result tables (markdown): latencies, rates, the ratio of every row to the first one,
//! and the target lines.

use super::{Hist, System};

/// One system's result in a latency table.
#[derive(Clone)]
pub struct LatRow {
    /// System name (may carry a qualifier, e.g. "velium io_uring (client lib)").
    pub name: String,
    /// Latencies.
    pub hist: Hist,
    /// A rate (per second) measured with it, if any.
    pub rate: Option<f64>,
    /// A free-form note printed after the row (e.g. errors, retries).
    pub note: String,
}

const QUANTILES: [(f64, &str); 4] = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")];

fn fmt_us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}", v)
    } else if v >= 100.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.2}", v)
    }
}

/// Formats a rate with thousands separators.
pub fn fmt_rate(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints a markdown table header: `columns` (the first left-aligned, the rest right), and
/// a last `rate` column when there is one.
fn print_header(columns: &[&str], rate: Option<&str>) {
    let cols: Vec<&str> = columns.iter().copied().chain(rate).collect();
    println!("| {} |", cols.join(" | "));
    println!("|---|{}", "---:|".repeat(cols.len() - 1));
}

/// Prints a latency table (markdown) and, when it has more than one row, the ratio of
/// every row to the first one.
pub fn print_latency_table(title: &str, rate_label: &str, rows: &[LatRow]) {
    if rows.is_empty() {
        return;
    }
    println!("### {title}");
    println!();
    let has_rate = rows.iter().any(|r| r.rate.is_some());
    print_header(
        &[
            "system",
            "samples",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "p99.9 µs",
            "max µs",
        ],
        has_rate.then_some(rate_label),
    );
    for r in rows {
        let mut line = format!("| {} | {} |", r.name, r.hist.len());
        for (q, _) in QUANTILES {
            line.push_str(&format!(" {} |", fmt_us(r.hist.us(q))));
        }
        line.push_str(&format!(" {} |", fmt_us(r.hist.max_us())));
        if has_rate {
            line.push_str(&format!(" {} |", r.rate.map_or("-".to_string(), fmt_rate)));
        }
        println!("{line}");
    }
    let notes: Vec<&LatRow> = rows.iter().filter(|r| !r.note.is_empty()).collect();
    if !notes.is_empty() {
        println!();
        for r in notes {
            println!("- {}: {}", r.name, r.note);
        }
    }
    println!();
    if rows.len() > 1 && !rows[0].hist.is_empty() {
        let base = &rows[0];
        println!(
            "Ratios to {} (latency: >1 = slower than it; {}: >1 = more than it):",
            base.name, rate_label
        );
        println!();
        print_header(
            &["system", "p50", "p90", "p99", "p99.9", "max"],
            has_rate.then_some(rate_label),
        );
        for r in rows {
            println!("{}", ratio_line(&r.name, r, base, has_rate));
        }
        println!();
    }
    // A baseline in the run: each of its rows against the current build's, driven alike.
    let pairs: Vec<(&LatRow, &LatRow)> = rows
        .iter()
        .filter_map(|before| {
            let name = after_name(&before.name)?;
            let after = rows.iter().find(|r| r.name == name)?;
            (!after.hist.is_empty() && !before.hist.is_empty()).then_some((after, before))
        })
        .collect();
    if !pairs.is_empty() {
        println!(
            "After vs before: each {} row over the {} row driven the same way (latency: <1 = \
             faster now{}):",
            System::VeliumUring.name(),
            System::VeliumBefore.name(),
            if has_rate {
                format!("; {rate_label}: >1 = more now")
            } else {
                String::new()
            }
        );
        println!();
        print_header(
            &["after vs before", "p50", "p90", "p99", "p99.9", "max"],
            has_rate.then_some(rate_label),
        );
        for (after, before) in pairs {
            println!("{}", ratio_line(&after.name, after, before, has_rate));
        }
        println!();
    }
}

/// A ratio table's line: `r` over `base`, quantile by quantile (and the rate).
fn ratio_line(name: &str, r: &LatRow, base: &LatRow, has_rate: bool) -> String {
    let mut line = format!("| {name} |");
    for (q, _) in QUANTILES {
        line.push_str(&format!(" {} |", ratio(r.hist.us(q), base.hist.us(q))));
    }
    line.push_str(&format!(
        " {} |",
        ratio(r.hist.max_us(), base.hist.max_us())
    ));
    if has_rate {
        let v = match (r.rate, base.rate) {
            (Some(a), Some(b)) => ratio(a, b),
            _ => "-".into(),
        };
        line.push_str(&format!(" {v} |"));
    }
    line
}

/// The name of the row a baseline row (one named after [`System::VeliumBefore`]) is
/// compared with: the same name with velium io_uring, the current build, in its place.
/// `None` for any other row.
pub fn after_name(before_row: &str) -> Option<String> {
    let before = System::VeliumBefore.name();
    before_row
        .contains(before)
        .then(|| before_row.replace(before, System::VeliumUring.name()))
}

/// Prints, for tables of one figure per row, the line comparing each baseline row with
/// the current build's: `rows` are (row name, figure), `fmt` formats a figure, and
/// `better` says which way is better ("more" or "less").
pub fn print_after_vs_before(
    what: &str,
    rows: &[(String, f64)],
    fmt: fn(f64) -> String,
    better: &str,
) {
    for (before, b) in rows {
        let Some(name) = after_name(before) else {
            continue;
        };
        if let Some((_, a)) = rows.iter().find(|(n, _)| *n == name) {
            println!(
                "After vs before, {what} ({better} is better): {name} {} over {before} {}: {}",
                fmt(*a),
                fmt(*b),
                ratio(*a, *b)
            );
            println!();
        }
    }
}

/// `a / b` formatted as `1.23x`.
pub fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "-".into()
    } else {
        format!("{:.2}x", a / b)
    }
}

/// Formats bytes as KiB / MiB.
pub fn fmt_bytes(b: f64) -> String {
    if b.abs() >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b.abs() >= 1024.0 {
        format!("{:.2} KiB", b / 1024.0)
    } else {
        format!("{:.0} B", b)
    }
}

/// A line for a target the project set: met or missed, with the figures behind it.
pub fn target(met: bool, what: &str, detail: &str) {
    println!(
        "- target {}: {what} ({detail})",
        if met { "MET" } else { "MISSED" }
    );
}

/// The position of the row named `name`.
pub fn find_row(rows: &[LatRow], name: &str) -> Option<usize> {
    rows.iter().position(|r| r.name == name)
}
