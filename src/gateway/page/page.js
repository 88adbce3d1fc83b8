// The status page's only script: polls status.json and renders it. No build step, no library.
(() => {
  "use strict";
  const POLL_MS = 1000; // live enough to watch a failover; one small JSON document per second
  const KEY = "clawmesh.token";
  const $ = (s) => document.querySelector(s);
  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

  // A token in the URL fragment (#token=...) is moved to this tab's sessionStorage and
  // removed from the address bar; it is sent as a Bearer header, never in a URL.
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }

  const ago = (ms) => {
    if (ms == null) return "never";
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 2) return "just now";
    if (s < 120) return s + "s ago";
    if (s < 7200) return Math.round(s / 60) + "m ago";
    if (s < 172800) return Math.round(s / 3600) + "h ago";
    return Math.round(s / 86400) + "d ago";
  };
  const since = (iso) => (iso ? ago(Date.parse(iso)) : "never");
  const dur = (s) => {
    if (s == null) return "–";
    if (s < 3600) return Math.round(s / 60) + "m";
    if (s < 172800) return Math.round(s / 3600) + "h";
    return Math.round(s / 86400) + "d";
  };
  const ms = (v) => (v == null ? "–" : v < 10 ? v.toFixed(1) + " ms" : Math.round(v) + " ms");
  const level = (p) => (p >= 90 ? "crit" : p >= 75 ? "warn" : "ok");
  const meter = (label, pct) => {
    if (pct == null) return "";
    const p = Math.max(0, Math.min(100, pct));
    return `<div class="meter" data-level="${level(p)}">${label ? `<span class="l">${label}</span>` : ""}` +
      `<div class="bar"><i style="width:${p.toFixed(1)}%"></i></div><span class="n">${Math.round(p)}%</span></div>`;
  };
  const meters = (v) => (v ? meter("CPU", v.cpuPct) + meter("MEM", v.memPct) + meter("DISK", v.diskPct) : "");

  function overview(d) {
    const gws = d.gateways || [];
    const off = gws.filter((g) => g.status === "offline").length;
    const list = d.nodes || [];
    const total = d.nodesTotal ?? list.length;
    const conn = d.nodesConnected ?? list.filter((n) => n.connected).length;
    const firing = (d.alerts && d.alerts.firing) || [];
    const c = d.consensus || {};
    const stat = (k, v, s, cls) =>
      `<div class="panel stat ${cls || ""}"><div class="k">${k}</div><div class="v">${esc(v)}</div><div class="s">${esc(s)}</div></div>`;
    $("#overview").innerHTML =
      stat("Gateways", `${gws.length - off}/${gws.length}`, off ? `${off} offline` : "all online", off ? "bad" : "ok") +
      stat("Nodes", `${conn}/${total}`, total - conn ? `${total - conn} disconnected` : "all connected", total - conn ? "bad" : "") +
      stat("Primary", d.primary || "none", c.quorum === false ? "no quorum" : `term ${c.term ?? "–"}`, d.primary ? "" : "bad") +
      stat("Alerts", firing.length, firing.length ? "firing" : "all clear", firing.length ? "bad" : "ok");
  }

  function alerts(d) {
    const a = d.alerts || {};
    const firing = a.firing || [];
    const resolved = (a.resolved || []).slice(0, 3);
    let h = firing.length
      ? ""
      : `<div class="allclear">✓ No alerts firing${a.evaluator ? ` · evaluated by ${esc(a.evaluator)}` : ""}</div>`;
    for (const f of firing) {
      h += `<div class="alert" data-alert="${esc(f.id)}"><span class="tag">FIRING</span>` +
        `<span class="msg">${esc(f.summary)}</span><span class="when">since ${ago(f.sinceMs)}</span></div>`;
    }
    if (firing.length) {
      for (const r of resolved) {
        h += `<div class="alert resolved"><span class="tag">RESOLVED</span>` +
          `<span class="msg">${esc(r.summary)}</span><span class="when">${ago(r.resolvedMs)}</span></div>`;
      }
    }
    $("#alerts").innerHTML = h;
  }

  function gateways(d) {
    const nodes = d.nodes || [];
    $("#gateways").innerHTML = (d.gateways || []).map((g) => {
      const v = g.vitals;
      const count = nodes.filter((n) => n.gateway === g.name && n.connected).length;
      const role = g.role === "primary" ? `<span class="badge primary">primary</span>` : "";
      const latency = g.isSelf ? "this one" : ms(g.latencyMs);
      const load = v && v.load1 != null ? `load ${v.load1.toFixed(2)} · ${v.cpus} cpu · up ${dur(v.uptimeS)}` : "no vitals yet";
      return `<article class="card" data-gateway="${esc(g.name)}" data-status="${esc(g.status)}">` +
        `<div class="row1"><span class="name">${esc(g.name)}</span>${role}` +
        `<span class="pill ${esc(g.status)}"><i></i>${esc(g.status)}</span></div>` +
        `<div class="sub">${esc(g.region || "no region")} · ${esc(g.addr)}</div>` +
        `<div class="facts"><div><div class="k">Latency</div><div class="v">${latency}</div></div>` +
        `<div><div class="k">Last seen</div><div class="v">${g.isSelf ? "now" : since(g.lastSeen)}</div></div>` +
        `<div><div class="k">Version</div><div class="v">${esc(g.version || "–")}</div></div></div>` +
        `<div class="meters">${meters(v)}</div>` +
        `<div class="sub" style="margin-top:6px">${count} node${count === 1 ? "" : "s"} · ${esc(load)}</div></article>`;
    }).join("");
  }

  function consensus(d) {
    const c = d.consensus || {};
    const up = new Set((d.gateways || []).filter((g) => g.status !== "offline").map((g) => g.name));
    const kv = (k, v) => `<span class="k">${k}</span><span class="v">${esc(v)}</span>`;
    $("#consensus").innerHTML =
      `<div class="kv">${kv("Primary", c.leader || "none")}${kv("Term", c.term ?? "–")}` +
      `${kv("Revision", c.applied ?? "–")}${kv("Voters reachable", `${c.reachableVoters ?? "–"} of ${(c.voters || []).length}`)}` +
      `${kv("Quorum", c.quorum ? "yes" : "NO: config writes refused")}</div>` +
      `<div class="voters">${(c.voters || []).map((v) => `<span class="voter ${up.has(v) ? "up" : "down"}">${esc(v)}</span>`).join("")}` +
      `${(c.learners || []).map((v) => `<span class="voter">${esc(v)} (learner)</span>`).join("")}</div>`;
  }

  function logs(d) {
    const l = d.logs || [];
    if (!l.length) {
      $("#logs").innerHTML = `<div class="empty">${esc(d.logsError || "No records collected yet (gateways ship their logs every few seconds).")}</div>`;
      return;
    }
    $("#logs").innerHTML = l.slice().reverse().map((r) => {
      const t = new Date(r.tsMs).toLocaleTimeString([], { hour12: false });
      return `<div class="log"><span class="t">${t}</span><span class="lv ${esc(r.level)}">${esc(r.level)}</span>` +
        `<span class="o">${esc(r.origin)}</span><span class="m">${esc(r.message)}</span></div>`;
    }).join("");
  }

  function nodes(d) {
    const list = d.nodes || [];
    if (!list.length) {
      $("#nodes").innerHTML = `<div class="panel empty">No nodes paired or attached.</div>`;
      return;
    }
    const groups = new Map();
    for (const n of list) {
      const g = n.gateway || "not connected";
      if (!groups.has(g)) groups.set(g, []);
      groups.get(g).push(n);
    }
    let rows = "";
    for (const [g, ns] of [...groups].sort((a, b) => a[0].localeCompare(b[0]))) {
      rows += `<tr class="group"><td colspan="7">${esc(g)} · ${ns.length}</td></tr>`;
      for (const n of ns.sort((a, b) => String(a.displayName).localeCompare(String(b.displayName)))) {
        const labels = Object.entries(n.labels || {}).map(([k, v]) => `<span class="chip">${esc(k)}=${esc(v)}</span>`).join("");
        const v = n.vitals || {};
        rows += `<tr data-node="${esc(n.displayName)}"><td data-k="Node"><span><span class="dot ${n.connected ? "on" : "off"}"></span><b>${esc(n.displayName || n.nodeId)}</b></span></td>` +
          `<td data-k="Labels"><span>${labels || "–"}</span></td>` +
          `<td data-k="Via">${esc(n.transport || "–")}</td>` +
          `<td data-k="CPU">${meter("", v.cpuPct) || "–"}</td><td data-k="Memory">${meter("", v.memPct) || "–"}</td>` +
          `<td data-k="Disk">${meter("", v.diskPct) || "–"}</td><td data-k="Load">${v.load1 != null ? v.load1.toFixed(2) : "–"}</td></tr>`;
      }
    }
    const more = (d.nodesTotal || 0) > list.length
      ? `<div class="sub" style="margin:0 0 8px">Showing ${list.length} of ${d.nodesTotal} nodes (disconnected first); <code>clawmesh nodes status --all</code> lists every one.</div>`
      : "";
    $("#nodes").innerHTML = more + `<table class="nodes"><thead><tr><th>Node</th><th>Labels</th><th>Via</th><th>CPU</th><th>Memory</th><th>Disk</th><th>Load</th></tr></thead><tbody>${rows}</tbody></table>`;
  }

  let last = null;
  function render(d) {
    last = d;
    document.body.classList.remove("locked");
    $("#login").hidden = true;
    $("#served-by").textContent = d.self || "";
    document.title = `${(d.gateways || []).some((g) => g.status === "offline") || ((d.alerts || {}).firing || []).length ? "⚠ " : ""}${d.self} · clawmesh`;
    overview(d); alerts(d); gateways(d); consensus(d); logs(d); nodes(d);
    tick();
  }
  function tick() {
    if (last) $("#updated").textContent = `updated ${ago(last.ts)} by ${last.self}`;
  }
  function live(state, text) {
    $("#live").dataset.state = state;
    $("#live-text").textContent = text;
  }
  function locked(msg) {
    document.body.classList.add("locked");
    $("#login").hidden = false;
    $("#login-error").textContent = msg || "";
    live("wait", "needs token");
  }

  let timer = null;
  async function poll() {
    clearTimeout(timer);
    const headers = {};
    const t = sessionStorage.getItem(KEY);
    if (t) headers.Authorization = "Bearer " + t;
    try {
      const r = await fetch("status.json", { headers, cache: "no-store" });
      if (r.status === 401) {
        sessionStorage.removeItem(KEY);
        locked(t ? "That token was refused." : "");
        return; // wait for the form
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      render(await r.json());
      live("ok", "live");
    } catch (e) {
      live("lost", "gateway unreachable, retrying");
    }
    timer = setTimeout(poll, POLL_MS);
  }

  $("#login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("#login-token").value.trim());
    $("#login-token").value = "";
    poll();
  });
  setInterval(tick, 1000);

  const initial = $("#initial").textContent.trim();
  if (initial && initial !== "null") {
    try { render(JSON.parse(initial)); live("ok", "live"); } catch (e) { /* the first poll renders */ }
  }
  poll();
})();
