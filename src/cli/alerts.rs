//! `clawmesh alerts [--json]`: the alerts firing now and those resolved recently, as the
//! gateway that evaluates them (the primary) keeps them; any gateway answers.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use crate::cli::args::AlertsArgs;
use crate::cli::output::{relative, rfc3339_ms, Table};
use crate::cli::{call, target};

/// Deadline of the request: the answering gateway may ask the evaluator (5 s) first.
const TIMEOUT: Duration = Duration::from_secs(10);

fn when(ms: &Value) -> String {
    rfc3339_ms(ms).as_str().map(relative).unwrap_or_default()
}

/// `clawmesh alerts ...`: exit 0 when nothing fires, 1 when something does (for cron).
pub async fn alerts(a: AlertsArgs, state_dir: &Path) -> Result<i32> {
    let t = target(a.target, state_dir);
    let doc = call(&t, "alerts.list", serde_json::json!({}), TIMEOUT).await?;
    let empty = Vec::new();
    let firing = doc["firing"].as_array().unwrap_or(&empty);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(i32::from(!firing.is_empty()));
    }
    let resolved = doc["resolved"].as_array().unwrap_or(&empty);
    if firing.is_empty() {
        println!("No alerts firing.");
    } else {
        let mut table = Table::new(&["state", "rule", "subject", "since", "summary"]);
        for f in firing {
            table.add_row([
                "FIRING".to_string(),
                f["rule"].as_str().unwrap_or_default().to_string(),
                f["subject"].as_str().unwrap_or_default().to_string(),
                when(&f["sinceMs"]),
                f["summary"].as_str().unwrap_or_default().to_string(),
            ]);
        }
        println!("{table}");
    }
    if !resolved.is_empty() {
        println!();
        let mut table = Table::new(&["state", "rule", "subject", "resolved", "summary"]);
        for r in resolved.iter().take(10) {
            table.add_row([
                "resolved".to_string(),
                r["rule"].as_str().unwrap_or_default().to_string(),
                r["subject"].as_str().unwrap_or_default().to_string(),
                when(&r["resolvedMs"]),
                r["summary"].as_str().unwrap_or_default().to_string(),
            ]);
        }
        println!("{table}");
    }
    let by = doc["evaluator"].as_str().unwrap_or("no gateway yet");
    println!("\nEvaluated by {by} (the primary).");
    if let Some(why) = doc["stale"].as_str() {
        println!(
            "This is {}'s copy: {why}.",
            doc["answeredBy"].as_str().unwrap_or("?")
        );
    }
    for w in doc["webhooks"].as_array().unwrap_or(&empty) {
        let n = |k: &str| w[k].as_u64().unwrap_or(0);
        if n("droppedFull") + n("droppedExpired") + n("refused") + n("queued") > 0 {
            println!(
                "Webhook {}: {} queued, {} dropped (queue full), {} given up, {} refused.",
                w["url"].as_str().unwrap_or("?"),
                n("queued"),
                n("droppedFull"),
                n("droppedExpired"),
                n("refused")
            );
        }
    }
    Ok(i32::from(!firing.is_empty()))
}
