//! How the CLI writes for people and for scripts: the one table style (plain, aligned columns
//! under upper-case headers: it fits an 80-column terminal, and it reads the same when
//! pasted into a log or a ticket, where box-drawing characters do not), relative times for
//! people, `--json` errors, and `--params` read from a file or stdin.

use std::fmt;
use std::io::Read as _;
use std::time::SystemTime;

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};

use crate::cli::exit::Failure;

/// A table in the CLI's one style: columns aligned, two spaces apart, headers upper-case.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_uppercase()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds one row (missing cells print empty, extra cells are kept).
    pub fn add_row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<&Vec<String>> = std::iter::once(&self.header).chain(&self.rows).collect();
        let cols = all.iter().map(|r| r.len()).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                all.iter()
                    .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for (i, r) in all.iter().enumerate() {
            let mut line = String::new();
            for (c, w) in widths.iter().enumerate() {
                let cell = r.get(c).map_or("", String::as_str);
                line.push_str(cell);
                if c + 1 < cols {
                    line.push_str(&" ".repeat(w - cell.chars().count() + 2));
                }
            }
            if i > 0 {
                writeln!(f)?;
            }
            f.write_str(line.trim_end())?;
        }
        Ok(())
    }
}

/// "12s ago", "3m ago", "in 4m" for an RFC 3339 time; the text itself if it does not parse.
pub fn relative(rfc3339: &str) -> String {
    relative_to(rfc3339, SystemTime::now())
}

/// [`relative`] against a given "now" (for tests).
pub fn relative_to(rfc3339: &str, now: SystemTime) -> String {
    let Ok(t) = humantime::parse_rfc3339_weak(rfc3339) else {
        return rfc3339.to_string();
    };
    let (secs, future) = match now.duration_since(t) {
        Ok(d) => (d.as_secs(), false),
        Err(e) => (e.duration().as_secs(), true),
    };
    let span = if secs < 1 {
        return "just now".into();
    } else if secs < 120 {
        format!("{secs}s")
    } else if secs < 7200 {
        format!("{}m", secs / 60)
    } else if secs < 172_800 {
        format!("{}h", secs / 3600)
    } else {
        format!("{}d", secs / 86400)
    };
    if future {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// A time in milliseconds since the epoch as RFC 3339 (for `--json`), or null.
pub fn rfc3339_ms(ms: &Value) -> Value {
    match ms.as_u64() {
        Some(ms) => Value::String(
            humantime::format_rfc3339_millis(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string(),
        ),
        None => Value::Null,
    }
}

/// The JSON document of a failed command under `--json`:
/// `{"ok":false,"error":{"code","message","exitCode"}}`.
pub fn error_json(err: &anyhow::Error, exit: i32) -> Value {
    let failure = err.chain().find_map(|c| c.downcast_ref::<Failure>());
    let code = failure.map_or("ERROR", |f| f.code.as_str());
    let message = match failure {
        Some(f) => f.message.clone(),
        None => format!("{err:#}"),
    };
    let mut e = json!({"code": code, "message": message, "exitCode": exit});
    if let Some(d) = failure.and_then(|f| f.details.clone()) {
        e["details"] = d;
    }
    json!({"ok": false, "error": e})
}

/// Whether the command line asks for JSON output (`--json` anywhere before a `--`): errors
/// are then a JSON document on stdout too, even those found before a command could run.
pub fn json_requested() -> bool {
    std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// Largest `--params` document read from a file or stdin: far above any request a gateway
/// accepts (its frame bound), small enough that a wrong file (a disk image) fails fast.
const MAX_PARAMS_BYTES: u64 = 64 * 1024 * 1024;

/// Reads `--params`: inline JSON, `@FILE` (the file's contents), or `-` (stdin), as curl
/// does. The result must be JSON.
pub fn read_params(arg: &str) -> Result<Value> {
    let (text, from) = if arg == "-" {
        let mut s = String::new();
        std::io::stdin()
            .take(MAX_PARAMS_BYTES)
            .read_to_string(&mut s)
            .context("cannot read --params from stdin")?;
        (s, "stdin".to_string())
    } else if let Some(path) = arg.strip_prefix('@') {
        let f = std::fs::File::open(path)
            .with_context(|| format!("cannot read --params file {path}"))?;
        let mut s = String::new();
        f.take(MAX_PARAMS_BYTES)
            .read_to_string(&mut s)
            .with_context(|| format!("cannot read --params file {path}"))?;
        (s, path.to_string())
    } else {
        return serde_json::from_str(arg).map_err(|e| {
            anyhow!("--params is not valid JSON ({e}): {arg} (use @FILE or - for a file or stdin)")
        });
    };
    serde_json::from_str(&text).map_err(|e| anyhow!("--params from {from} is not valid JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_aligned_plain_columns() {
        let mut t = Table::new(&["Node", "Ip"]);
        t.add_row(["web-1", "10.0.0.1"]);
        t.add_row(["a", "-"]);
        assert_eq!(t.to_string(), "NODE   IP\nweb-1  10.0.0.1\na      -");
    }

    #[test]
    fn relative_times_both_ways() {
        let now = humantime::parse_rfc3339("2026-01-01T00:10:00Z").unwrap();
        assert_eq!(relative_to("2026-01-01T00:09:50Z", now), "10s ago");
        assert_eq!(relative_to("2026-01-01T00:15:00Z", now), "in 5m");
        assert_eq!(relative_to("garbage", now), "garbage");
    }
}
