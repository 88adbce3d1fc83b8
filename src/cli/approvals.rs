//! `clawmesh approvals get|set|allow|deny`: a node's exec approvals, read and changed through
//! its gateway (or in a local file with `--file`).

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use crate::cli::args::ApprovalsCmd;
use crate::cli::client::Target;
use crate::cli::{call, CALL_TIMEOUT};
use crate::node::approvals::{self, Security};

/// `clawmesh approvals ...`
pub async fn approvals(cmd: ApprovalsCmd, state_dir: &Path) -> Result<i32> {
    let (node, t) = match &cmd {
        ApprovalsCmd::Get {
            node, target: ta, ..
        }
        | ApprovalsCmd::Set {
            node, target: ta, ..
        }
        | ApprovalsCmd::Allow {
            node, target: ta, ..
        }
        | ApprovalsCmd::Deny {
            node, target: ta, ..
        } => (
            node.clone(),
            Target::from_flags(ta.url.clone(), ta.token.clone(), state_dir),
        ),
    };
    let snap = call(
        &t,
        "exec.approvals.node.get",
        json!({"nodeId": node}),
        CALL_TIMEOUT,
    )
    .await?;
    let mut file = snap["file"].clone();
    if file.is_null() {
        file = json!({"version": 1});
    }
    let edit = |f: &mut Value| -> Result<String> {
        match &cmd {
            ApprovalsCmd::Set { security, .. } => {
                let level: Security = security.parse().map_err(|e| anyhow!("--security: {e}"))?;
                approvals::set_security(f, level)?;
                Ok(format!("exec security on {node} is now {level}"))
            }
            ApprovalsCmd::Allow { pattern, .. } => {
                let added = approvals::allow_pattern(f, pattern)?;
                Ok(if added {
                    format!("allowed {pattern} on {node}")
                } else {
                    format!("{pattern} was already allowed on {node}")
                })
            }
            ApprovalsCmd::Deny { pattern, .. } => {
                let n = approvals::remove_pattern(f, pattern)?;
                if n == 0 {
                    bail!("{pattern} is not in the allowlist of {node}");
                }
                Ok(format!("removed {pattern} from the allowlist of {node}"))
            }
            ApprovalsCmd::Get { .. } => Ok(String::new()),
        }
    };
    if let ApprovalsCmd::Get { json, .. } = &cmd {
        if *json {
            println!("{}", serde_json::to_string_pretty(&snap)?);
        } else {
            println!("{}: {}", node, snap["path"].as_str().unwrap_or("?"));
            println!("{}", serde_json::to_string_pretty(&file)?);
        }
        return Ok(0);
    }
    let msg = edit(&mut file)?;
    let mut params = json!({"nodeId": node, "file": file});
    if let Some(h) = snap["hash"].as_str() {
        params["baseHash"] = json!(h);
    }
    call(&t, "exec.approvals.node.set", params, CALL_TIMEOUT).await?;
    println!("{msg}");
    Ok(0)
}
