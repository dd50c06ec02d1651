//! Output: Markdown tables for people, JSON for tools.
//!
//! Every scenario returns a plain serialisable report; printing is separate, so `compare`
//! can print the per-scenario tables as it goes and one summary table at the end, and write
//! everything it measured as one JSON document.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

/// A Markdown table, columns padded so it also reads well in a terminal.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Self {
        Self {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// Headers then rows, as plain cells (for JSON).
    pub fn cells(&self) -> Vec<Vec<String>> {
        std::iter::once(self.headers.clone())
            .chain(self.rows.iter().cloned())
            .collect()
    }

    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let mut width: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(cols) {
                width[i] = width[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::from("|");
            for (i, w) in width.iter().enumerate() {
                let cell = cells.get(i).map_or("", String::as_str);
                let pad = w - cell.chars().count();
                // Text left, numbers right.
                if i > 0 && cell.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '×')
                {
                    s.push_str(&format!(" {}{} |", " ".repeat(pad), cell));
                } else {
                    s.push_str(&format!(" {}{} |", cell, " ".repeat(pad)));
                }
            }
            s
        };
        let mut out = line(&self.headers);
        out.push('\n');
        out.push('|');
        for w in &width {
            out.push_str(&format!("{}|", "-".repeat(w + 2)));
        }
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }
}

/// A number with `decimals` decimals, `-` when absent or not finite.
pub fn num(value: Option<f64>, decimals: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "-".into(),
    }
}

/// An integer with thousands separators.
pub fn int(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The end of a command: writes the report to `out` if asked, prints the failures, and
/// says whether there were none.
pub fn finish(
    out: Option<&Path>,
    report: &impl Serialize,
    failures: &[String],
) -> anyhow::Result<bool> {
    if let Some(path) = out {
        write_json(path, report)?;
        eprintln!("wrote {}", path.display());
    }
    for f in failures {
        eprintln!("FAILED: {f}");
    }
    Ok(failures.is_empty())
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// When a run starts, in Unix seconds, and what else the machine is doing then
/// (`/proc/loadavg`): every report carries both, so a reader can tell a noisy run.
pub fn run_start() -> (u64, Option<String>) {
    let unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.trim().to_string());
    (unix_s, load)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_render_as_markdown() {
        let mut t = Table::new(["metric", "a"]);
        t.row(["conn/s", "1,234"]);
        let s = t.render();
        assert_eq!(
            s,
            "| metric | a     |\n|--------|-------|\n| conn/s | 1,234 |\n"
        );
    }

    #[test]
    fn integers_are_grouped() {
        assert_eq!(int(0), "0");
        assert_eq!(int(999), "999");
        assert_eq!(int(240000), "240,000");
        assert_eq!(int(1234567), "1,234,567");
        assert_eq!(num(None, 1), "-");
        assert_eq!(num(Some(1.26), 1), "1.3");
    }
}
