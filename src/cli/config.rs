//! `clawmesh config get|set|unset|show|import`: the federation's shared config from any
//! gateway. Writes made on a remote are forwarded to the primary and return once a majority of
//! voting gateways has them durably.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};

use crate::cli::client::Target;
use crate::cli::{call, TargetArgs};

/// How long the CLI waits for a write: the gateway's own write timeout (5 s by default,
/// covering an election) plus a WAN round trip.
const WRITE_WAIT: Duration = Duration::from_secs(20);

/// `clawmesh config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// The value of one key here: effective, synced and local.
    Get {
        /// Dotted key, e.g. models.default.
        key: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
    /// Set a shared key (VALUE is JSON; anything that is not JSON is taken as a string).
    Set {
        /// Dotted key, e.g. models.default.
        key: String,
        /// Value, e.g. '"gpt-5"', 30000, true, '{"baseUrl":"..."}' or plain text.
        value: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
    /// Remove a shared key.
    Unset {
        /// Dotted key.
        key: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
    /// Set every leaf of a JSON file as shared keys, in one revision.
    Import {
        /// JSON file (nested objects become dotted keys).
        file: std::path::PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
    /// The shared config (or, with --effective, what is in force here and where it came from).
    Show {
        /// Merge with this gateway's clawmesh.json under its gateway.sync.* policy.
        #[arg(long)]
        effective: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        /// Target.
        target: TargetArgs,
    },
}

/// A CLI value: JSON if it parses, else the text as a string.
pub fn parse_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

fn print_write(doc: &Value, json_out: bool, what: &str) -> Result<()> {
    for p in doc["shadowedHere"].as_array().into_iter().flatten() {
        eprintln!(
            "note: {} is pinned on {} by its {} (not applied there; see `config show --effective`)",
            p["key"].as_str().unwrap_or("?"),
            doc["gateway"].as_str().unwrap_or("this gateway"),
            p["source"].as_str().unwrap_or("?"),
        );
    }
    if json_out {
        println!("{}", serde_json::to_string(doc)?);
    } else {
        println!(
            "{what} at revision {} (primary {})",
            doc["revision"],
            doc["primary"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Runs a `config` subcommand.
pub async fn run(cmd: ConfigCmd, state_dir: &Path) -> Result<i32> {
    let target = |t: TargetArgs| Target::from_flags(t.url, t.token, state_dir);
    match cmd {
        ConfigCmd::Get {
            key,
            json,
            target: t,
        } => {
            let doc = call(
                &target(t),
                "config.get",
                json!({"key": key}),
                Duration::from_secs(10),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(0);
            }
            if doc["found"] != true {
                match doc["notApplied"].as_str() {
                    Some(why) => eprintln!("{key} is synced but not applied here ({why})"),
                    None => eprintln!("{key} is not set"),
                }
                return Ok(1);
            }
            let e = &doc["effective"];
            println!("{}", text(&e["value"]));
            let mut from = format!("source: {}", e["source"].as_str().unwrap_or("?"));
            if let Some(s) = e.get("shadowed") {
                from.push_str(&format!(
                    " (overrides {}: {})",
                    s["source"].as_str().unwrap_or("?"),
                    text(&s["value"])
                ));
            }
            eprintln!("{from}");
            Ok(0)
        }
        ConfigCmd::Set {
            key,
            value,
            json: j,
            target: t,
        } => {
            let doc = call(
                &target(t),
                "config.set",
                json!({"key": key, "value": parse_value(&value)}),
                WRITE_WAIT,
            )
            .await?;
            print_write(&doc, j, &format!("set {key}"))?;
            Ok(0)
        }
        ConfigCmd::Unset {
            key,
            json: j,
            target: t,
        } => {
            let doc = call(&target(t), "config.unset", json!({"key": key}), WRITE_WAIT).await?;
            if doc["keys"] == 0 && !j {
                println!(
                    "{key} is not set; nothing written (still revision {})",
                    doc["revision"]
                );
                return Ok(0);
            }
            print_write(&doc, j, &format!("unset {key}"))?;
            Ok(0)
        }
        ConfigCmd::Import {
            file,
            json: j,
            target: t,
        } => {
            let body = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let v: Value = serde_json::from_str(&body)
                .with_context(|| format!("{} is not valid JSON", file.display()))?;
            if !v.is_object() {
                bail!("{}: the top level must be a JSON object", file.display());
            }
            let values: serde_json::Map<String, Value> =
                crate::config::dotted_leaves(&v).into_iter().collect();
            let n = values.len();
            let doc = call(
                &target(t),
                "config.set",
                json!({"values": values}),
                WRITE_WAIT,
            )
            .await?;
            print_write(&doc, j, &format!("imported {n} keys"))?;
            Ok(0)
        }
        ConfigCmd::Show {
            effective,
            json: j,
            target: t,
        } => {
            let doc = call(
                &target(t),
                "config.show",
                json!({"effective": effective}),
                Duration::from_secs(10),
            )
            .await?;
            if j {
                println!("{}", serde_json::to_string_pretty(&doc)?);
                return Ok(0);
            }
            print!("{}", render(&doc, effective));
            Ok(0)
        }
    }
}

/// `config show` as a table.
pub fn render(doc: &Value, effective: bool) -> String {
    let mut out = String::new();
    let c = &doc["consensus"];
    out.push_str(&format!(
        "Shared config on {} at revision {} (primary: {}, role: {}, term {})\n",
        doc["gateway"].as_str().unwrap_or("?"),
        doc["revision"],
        c["leader"].as_str().unwrap_or("none"),
        c["role"].as_str().unwrap_or("?"),
        c["term"],
    ));
    let entries = doc["entries"].as_array().cloned().unwrap_or_default();
    if entries.is_empty() {
        out.push_str("  (no keys)\n");
    }
    let width = entries
        .iter()
        .filter_map(|e| e["key"].as_str().map(str::len))
        .max()
        .unwrap_or(0);
    for e in &entries {
        let key = e["key"].as_str().unwrap_or("?");
        let value = text(&e["value"]);
        if effective {
            let mut line = format!(
                "  {key:<width$}  {value}  [{}]",
                e["source"].as_str().unwrap_or("?")
            );
            if let Some(s) = e.get("shadowed") {
                line.push_str(&format!(
                    " (overrides {}: {})",
                    s["source"].as_str().unwrap_or("?"),
                    text(&s["value"])
                ));
            }
            out.push_str(&line);
        } else {
            out.push_str(&format!("  {key:<width$}  {value}  [r{}]", e["revision"]));
        }
        out.push('\n');
    }
    if let Some(ign) = doc["notApplied"].as_array().filter(|a| !a.is_empty()) {
        out.push_str("Not applied here:\n");
        for i in ign {
            out.push_str(&format!(
                "  {}  [r{}]  {}\n",
                i["key"].as_str().unwrap_or("?"),
                i["revision"],
                i["reason"].as_str().unwrap_or("")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_as_json_or_text() {
        assert_eq!(parse_value("30000"), json!(30000));
        assert_eq!(parse_value("true"), json!(true));
        assert_eq!(parse_value("\"x\""), json!("x"));
        assert_eq!(parse_value("gpt-5"), json!("gpt-5"));
        assert_eq!(parse_value("{\"a\":1}"), json!({"a":1}));
    }
}
