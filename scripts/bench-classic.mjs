// bench-classic.mjs: node.invoke latency and throughput against the classic OpenClaw gateway.
//
// The sequential part is the bench client of docs/classic-protocol.md Appendix B (operator,
// token auth, no device, client id "cli", scope operator.write, system.which {"bins":["sh"]},
// timeoutMs 15000, 10 warm-up calls, one call at a time). Added: a throughput phase with many
// concurrent callers, a JSON summary line for examples/bench_invoke.rs, and bounded waits.
//
// Usage (run it with the Node that install-classic-client.sh installed):
//   node scripts/bench-classic.mjs URL TOKEN NODE_ID N [CALLERS] [CONNS] [SECONDS]
//     URL      ws://127.0.0.1:PORT of `openclaw gateway run`
//     N        sequential measured calls (after 10 warm-up calls; 0 = throughput only)
//     CALLERS  concurrent callers for the throughput phase (0 = skip; default 0)
//     CONNS    WebSocket connections the callers are spread over (default 1)
//     SECONDS  length of the throughput phase (default 5)
//   Env CLASSIC_PREFIX: the install prefix (default ~/.cache/clawmesh/classic); the "ws" package
//   is resolved from PREFIX/node_modules (openclaw depends on it), so nothing else is installed.
//
// Output: a human line per phase on stderr and, last on stdout, one JSON line:
//   {"seq":{"n","p50","p90","p99","max","mean"}|null, "health":{same keys}|null,
//    "conc":{"callers","conns","secs","calls","errors","firstError","rate","p50","p99"}|null}
//   (latencies in ms; "health" is the same count of `health` calls, operator -> gateway only)
// Quantiles are nearest-rank: the ceil(p*n)-th smallest sample (same as bench_invoke.rs).
import crypto from "node:crypto";
import { createRequire } from "node:module";
import os from "node:os";
import path from "node:path";

const prefix = process.env.CLASSIC_PREFIX || path.join(os.homedir(), ".cache/clawmesh/classic");
const require = createRequire(path.join(prefix, "node_modules", "openclaw", "package.json"));
const WebSocket = require("ws");

const [url, token, nodeId, nArg, callersArg, connsArg, secsArg] = process.argv.slice(2);
if (!url || !token || !nodeId || !nArg) {
  console.error("usage: bench-classic.mjs URL TOKEN NODE_ID N [CALLERS] [CONNS] [SECONDS]");
  process.exit(2);
}
const N = Math.max(0, Math.min(1_000_000, Number(nArg) | 0));
const CALLERS = Math.max(0, Math.min(10_000, Number(callersArg || 0) | 0));
const CONNS = Math.max(1, Math.min(CALLERS || 1, Number(connsArg || 1) | 0));
const SECS = Math.max(1, Math.min(600, Number(secsArg || 5)));
const CALL_TIMEOUT_MS = 20_000; // above the invoke's own timeoutMs (15 000)
const WARMUP = 10;

// Whole-run watchdog: never hang (sequential calls + throughput phase + slack).
const watchdog = setTimeout(() => {
  console.error("bench-classic: watchdog expired");
  process.exit(3);
}, 120_000 + 2 * N * 1_000 + SECS * 1_000 * 3);
watchdog.unref();

/** Opens one operator connection (challenge -> connect) and resolves with {call, close}. */
function open() {
  return new Promise((resolve, reject) => {
    let seq = 0;
    const pend = new Map();
    const ws = new WebSocket(url, { perMessageDeflate: false });
    const fail = (e) => {
      for (const p of pend.values()) p.rej(e);
      pend.clear();
      reject(e);
    };
    const call = (method, params) =>
      new Promise((res, rej) => {
        const id = `${++seq}:${crypto.randomUUID()}`;
        const timer = setTimeout(() => {
          pend.delete(id);
          rej(new Error(`${method}: no reply within ${CALL_TIMEOUT_MS} ms`));
        }, CALL_TIMEOUT_MS);
        pend.set(id, {
          res: (v) => (clearTimeout(timer), res(v)),
          rej: (e) => (clearTimeout(timer), rej(e)),
        });
        ws.send(JSON.stringify({ type: "req", id, method, params }));
      });
    const hello = setTimeout(() => fail(new Error("no hello within 15 s")), 15_000);
    ws.on("error", fail);
    ws.on("close", (code, reason) => fail(new Error(`closed ${code} ${reason}`)));
    ws.on("message", async (d) => {
      const f = JSON.parse(d);
      if (f.type === "res") {
        const p = pend.get(f.id);
        if (!p) return;
        pend.delete(f.id);
        f.ok ? p.res(f.payload) : p.rej(Object.assign(new Error(f.error?.message), f.error));
        return;
      }
      if (f.event !== "connect.challenge") return;
      try {
        await call("connect", {
          minProtocol: 4, maxProtocol: 4,
          client: { id: "cli", version: "2026.9.6", platform: "linux", mode: "cli" },
          role: "operator", scopes: ["operator.write"], caps: [], auth: { token },
        });
        clearTimeout(hello);
        resolve({ call, close: () => ws.close() });
      } catch (e) {
        clearTimeout(hello);
        fail(e);
      }
    });
  });
}

const invoke = (c) =>
  c.call("node.invoke", {
    nodeId, command: "system.which", params: { bins: ["sh"] },
    idempotencyKey: crypto.randomUUID(), timeoutMs: 15000,
  });

function quantiles(lat) {
  lat.sort((a, b) => a - b);
  const q = (p) => lat[Math.min(lat.length, Math.max(1, Math.ceil(p * lat.length))) - 1];
  const mean = lat.reduce((s, x) => s + x, 0) / lat.length;
  return { n: lat.length, p50: q(0.5), p90: q(0.9), p99: q(0.99), max: lat.at(-1), mean };
}

const f2 = (x) => x.toFixed(2);
const now = () => Number(process.hrtime.bigint()) / 1e6;

const conns = [];
try {
  conns.push(await open());
  // Sequential: Appendix B.
  for (let i = 0; i < WARMUP; i++) await invoke(conns[0]);
  const lat = [];
  for (let i = 0; i < N; i++) {
    const t = now();
    await invoke(conns[0]);
    lat.push(now() - t);
  }
  const seq = N > 0 ? quantiles(lat) : null;
  if (seq) console.error(`sequential n=${seq.n} p50=${f2(seq.p50)}ms p90=${f2(seq.p90)}ms p99=${f2(seq.p99)}ms max=${f2(seq.max)}ms mean=${f2(seq.mean)}ms`);
  // `health` (operator -> gateway only, no node hop), same count, for comparison.
  let health = null;
  if (N > 0) {
    for (let i = 0; i < WARMUP; i++) await conns[0].call("health", {});
    const hl = [];
    for (let i = 0; i < N; i++) {
      const t = now();
      await conns[0].call("health", {});
      hl.push(now() - t);
    }
    health = quantiles(hl);
    console.error(`health n=${health.n} p50=${f2(health.p50)}ms p99=${f2(health.p99)}ms`);
  }

  // Throughput: CALLERS callers, spread round-robin over CONNS connections, for SECS seconds.
  let conc = null;
  if (CALLERS > 0) {
    while (conns.length < CONNS) conns.push(await open());
    for (const c of conns) await invoke(c); // warm every connection
    const clat = [];
    let errors = 0;
    let firstError = null;
    const t0 = now();
    const end = t0 + SECS * 1000;
    const caller = async (k) => {
      const c = conns[k % conns.length];
      while (now() < end && errors < 1000) {
        const t = now();
        try {
          await invoke(c);
          clat.push(now() - t);
        } catch (e) {
          errors++;
          firstError ??= e?.message ?? String(e);
        }
      }
    };
    await Promise.all(Array.from({ length: CALLERS }, (_, k) => caller(k)));
    const secs = (now() - t0) / 1000;
    const cq = clat.length ? quantiles(clat) : { p50: NaN, p99: NaN };
    conc = { callers: CALLERS, conns: conns.length, secs, calls: clat.length, errors,
             firstError, rate: clat.length / secs, p50: cq.p50, p99: cq.p99 };
    console.error(`concurrent callers=${CALLERS} conns=${conns.length} ${clat.length} calls in ${secs.toFixed(2)} s = ${conc.rate.toFixed(0)}/s p50=${f2(cq.p50)}ms p99=${f2(cq.p99)}ms errors=${errors}${firstError ? ` (${firstError})` : ""}`);
  }
  console.log(JSON.stringify({ seq, health, conc }));
  for (const c of conns) c.close();
  process.exit(0);
} catch (e) {
  console.error(`bench-classic: ${e?.message ?? e}`);
  for (const c of conns) c.close();
  process.exit(1);
}
