// ddpushd console. Plain JavaScript: no framework, no build step, no inline code (the page's
// Content-Security-Policy forbids it) and no request to anywhere but this server.
//
// Data: GET /console/data every 2 s (with ?since= so each poll carries only new chart points),
// POST /console/lookup, and the admin API's own POST /push and POST /clients/{uuid}/clear.
// Every request carries the admin token (if any) as a bearer header; every POST carries the
// x-ddpush-csrf header and a JSON body, which the server requires of state-changing requests.
"use strict";

(function () {
  const TOKEN_KEY = "ddpushd-admin-token";
  const POLL_MS = 2000;
  const WINDOW_MS = 15 * 60 * 1000;
  const VIEWS = ["overview", "clients", "push", "cluster"];
  const CHARTS = [
    { id: "heartbeats", title: "Heartbeats/s", series: [["heartbeats", "heartbeats"]] },
    {
      id: "pushes",
      title: "Pushes/s",
      series: [["pushes_accepted", "accepted"], ["pushes_rejected", "rejected"]],
    },
    { id: "deliveries", title: "Deliveries/s", series: [["deliveries", "deliveries"]] },
    { id: "resends", title: "Re-sends/s", series: [["resends", "re-sends"]] },
    { id: "invalid", title: "Invalid packets/s", series: [["invalid", "invalid"]] },
    { id: "limited", title: "Abuse-limit hits/s", series: [["limited", "limit hits"]] },
  ];
  const SVG_NS = "http://www.w3.org/2000/svg";
  const PLOT_W = 900;
  const PLOT_H = 100;

  // The token lives in this tab's sessionStorage only: asked once per tab, gone when the tab
  // closes, never in a URL or a cookie.
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let authed = false;
  let pollTimer = null;
  let seq = 0;
  let lastUptime = 0;
  let points = { t: [], s: {} };
  let current = null; // the record shown by the lookup

  const $ = (id) => document.getElementById(id);

  class AuthError extends Error {}

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  }

  // --- formatting: every number is written out, units included ---
  const fmtInt = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
  function fmtRate(v) {
    if (v === undefined || v === null) return "–";
    if (v >= 100) return Math.round(v).toLocaleString("en-US");
    return String(Math.round(v * 100) / 100);
  }
  function fmtDuration(s) {
    if (s === null || s === undefined) return "–";
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60), sec = Math.floor(s % 60);
    if (d) return `${d} d ${h} h`;
    if (h) return `${h} h ${m} min`;
    if (m) return `${m} min ${sec} s`;
    return `${sec} s`;
  }
  const fmtMs = (ms) =>
    ms === null || ms === undefined ? "no acks" : ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`;
  function fmtBytes(b) {
    if (b === null || b === undefined) return "–";
    if (b < 1024) return `${b} B`;
    if (b < 1048576) return `${(b / 1024).toFixed(1)} KiB`;
    return `${(b / 1048576).toFixed(1)} MiB`;
  }
  const fmtTime = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC") : "never");

  // --- the API ---
  async function api(method, path, body) {
    const headers = {};
    if (token) headers["Authorization"] = "Bearer " + token;
    const init = { method, headers, cache: "no-store", redirect: "error" };
    if (method !== "GET") {
      headers["Content-Type"] = "application/json";
      headers["X-DDPush-CSRF"] = "1";
      init.body = typeof body === "string" ? body : JSON.stringify(body || {});
    }
    const r = await fetch(path, init);
    let data = null;
    try {
      data = await r.json();
    } catch (_) {
      data = null;
    }
    if (r.status === 401) {
      showLogin(token ? "The server refused this token." : "");
      throw new AuthError("unauthorized");
    }
    return { status: r.status, data };
  }

  // --- login ---
  function showLogin(message) {
    authed = false;
    token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    stopPolling();
    clearData();
    for (const v of VIEWS) $("view-" + v).hidden = true;
    $("nav").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("live").textContent = "signed out";
    $("token").focus();
  }

  function signedIn() {
    authed = true;
    $("login").hidden = true;
    $("nav").hidden = false;
    $("logout").hidden = !token;
    route();
    startPolling();
  }

  async function onLogin(ev) {
    ev.preventDefault();
    const t = $("token").value.trim();
    if (!t) return;
    token = t;
    try {
      const r = await api("GET", "/console/data");
      if (r.status !== 200) throw new Error((r.data && r.data.error) || `HTTP ${r.status}`);
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token").value = "";
      resetHistory();
      render(r.data);
      signedIn();
    } catch (e) {
      if (!(e instanceof AuthError)) $("login-error").textContent = "Cannot reach the server: " + e.message;
    }
  }

  // --- views ---
  function route() {
    if (!authed) return;
    const want = (location.hash || "#overview").slice(1);
    const view = VIEWS.includes(want) ? want : "overview";
    for (const v of VIEWS) {
      $("view-" + v).hidden = v !== view;
      const a = $("nav-" + v);
      if (v === view) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
  }

  // --- overview and charts ---
  function buildCharts() {
    const box = $("charts");
    for (const c of CHARTS) {
      const svg = document.createElementNS(SVG_NS, "svg");
      svg.setAttribute("viewBox", `0 0 ${PLOT_W} ${PLOT_H}`);
      svg.setAttribute("preserveAspectRatio", "none");
      svg.setAttribute("role", "img");
      svg.setAttribute("aria-label", c.title + " over the last 15 minutes");
      c.series.forEach((_, i) => {
        const line = document.createElementNS(SVG_NS, "polyline");
        line.setAttribute("vector-effect", "non-scaling-stroke");
        if (i > 0) line.setAttribute("class", "second");
        line.id = `line-${c.id}-${i}`;
        svg.append(line);
      });
      const fig = el(
        "figure",
        { class: "chart", id: "chart-" + c.id },
        el("figcaption", {}, el("span", {}, c.title), el("span", { class: "now", id: "now-" + c.id }, "–")),
        el(
          "div",
          { class: "plot" },
          el("div", { class: "yaxis" }, el("span", { id: "ymax-" + c.id }, "1"), el("span", {}, "0")),
          svg,
          el("div", { class: "xaxis" }, el("span", {}, "−15 min"), el("span", {}, "−7.5 min"), el("span", {}, "now"))
        )
      );
      if (c.series.length > 1) {
        fig.append(el("p", { class: "legend" }, "solid line: accepted · dashed line: rejected"));
      }
      box.append(fig);
    }
  }

  function resetHistory() {
    seq = 0;
    lastUptime = 0;
    points = { t: [], s: {} };
  }

  function mergeRates(r) {
    const first = r.seq - r.t_ms.length + 1;
    r.t_ms.forEach((t, i) => {
      if (first + i <= seq) return;
      points.t.push(t);
      for (const [name, col] of Object.entries(r.series)) {
        (points.s[name] = points.s[name] || []).push(col[i]);
      }
    });
    seq = Math.max(seq, r.seq);
    const newest = points.t.length ? points.t[points.t.length - 1] : 0;
    let drop = 0;
    while (drop < points.t.length && points.t[drop] < newest - WINDOW_MS) drop++;
    if (drop) {
      points.t.splice(0, drop);
      for (const col of Object.values(points.s)) col.splice(0, drop);
    }
  }

  function niceMax(v) {
    if (v <= 1) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  function drawCharts(nowMs) {
    const start = nowMs - WINDOW_MS;
    for (const c of CHARTS) {
      const cols = c.series.map(([name]) => points.s[name] || []);
      const max = niceMax(Math.max(0, ...cols.flat()));
      $("ymax-" + c.id).textContent = fmtRate(max);
      cols.forEach((col, i) => {
        const pts = col
          .map((v, k) => {
            const x = ((points.t[k] - start) / WINDOW_MS) * PLOT_W;
            const y = PLOT_H - (v / max) * PLOT_H;
            return `${Math.max(0, x).toFixed(1)},${y.toFixed(1)}`;
          })
          .join(" ");
        $(`line-${c.id}-${i}`).setAttribute("points", pts);
      });
      const last = (col) => (col.length ? col[col.length - 1] : undefined);
      $("now-" + c.id).textContent =
        c.series.length > 1
          ? c.series.map(([, label], i) => `${fmtRate(last(cols[i]))} ${label}`).join(" · ")
          : `now ${fmtRate(last(cols[0]))}`;
    }
  }

  function render(d) {
    // A cluster node: its own clients and counters, the store in place of the journal, and
    // null for what only the store knows (docs/CLUSTER.md).
    const cluster = d.cluster.mode === "cluster";
    $("ov-clients-label").textContent = cluster ? "Clients here" : "Clients";
    $("ov-journal-label").textContent = cluster ? "Store" : "Journal";
    $("ov-clients").textContent = fmtInt(d.clients);
    $("ov-online").textContent = fmtInt(d.online);
    $("ov-p10").textContent = fmtInt(d.pending["0x10"]);
    $("ov-p11").textContent = fmtInt(d.pending["0x11"]);
    $("ov-p20").textContent = fmtInt(d.pending["0x20"]);
    const measured = d.latency.samples !== null;
    $("ov-p50").textContent = measured ? fmtMs(d.latency.p50_ms) : "n/a";
    $("ov-p99").textContent = measured ? fmtMs(d.latency.p99_ms) : "n/a";
    $("ov-storage").textContent = d.storage.journal === "ok" ? "OK" : "DEGRADED";
    $("ov-uptime").textContent = fmtDuration(d.uptime_s);
    $("ov-version").textContent = d.version;
    $("ov-latency").textContent = !measured
      ? "not measured on a cluster node"
      : d.latency.samples === 0
        ? `no acks in the last ${d.latency.window_s / 60} minutes`
        : `p50 ${fmtMs(d.latency.p50_ms)}, p99 ${fmtMs(d.latency.p99_ms)} over ${fmtInt(d.latency.samples)} ` +
          `acks in the last ${d.latency.window_s / 60} minutes (1 s resolution)`;
    const st = d.storage.store;
    $("ov-journal").textContent = cluster
      ? (st.connected
          ? "Redis Cluster connected"
          : "UNREACHABLE: pushes are answered 0xFF (HTTP 503) until the store is back") +
        `; operations p50 ${st.latency_ms.p50 === null ? "–" : "≤ " + st.latency_ms.p50 + " ms"}, ` +
        `p99 ${st.latency_ms.p99 === null ? "–" : "≤ " + st.latency_ms.p99 + " ms"} (histogram bounds); ` +
        `${fmtInt(st.errors)} errors, ${fmtInt(st.timeouts)} time-outs`
      : (d.storage.journal === "ok"
          ? "writing normally"
          : "DEGRADED: a write to the data directory failed; pushes are refused (0xFF / HTTP 503) until one succeeds") +
        `; ${fmtInt(d.storage.journal_writes)} writes`;
    $("ov-snapshot").textContent = cluster
      ? "none: a cluster node keeps its state in the store"
      : d.storage.last_snapshot_age_s === null
        ? `none since start (${fmtInt(d.storage.snapshots)} written)`
        : `${fmtDuration(d.storage.last_snapshot_age_s)} ago, ${fmtBytes(d.storage.last_snapshot_bytes)} ` +
          `in ${d.storage.last_snapshot_ms} ms (${fmtInt(d.storage.snapshots)} since start)`;
    $("ov-conns").textContent = cluster
      ? "not counted on a cluster node"
      : `${fmtInt(d.tcp_connections.device)} device, ${fmtInt(d.tcp_connections.push)} push`;
    $("ov-memory").textContent = cluster ? "not measured on a cluster node" : fmtBytes(d.memory_bytes);
    const t = d.totals;
    $("ov-totals").textContent =
      `${fmtInt(t.heartbeats)} heartbeats, ${fmtInt(t.pushes_accepted)} pushes accepted, ` +
      `${fmtInt(t.pushes_rejected)} rejected, ${fmtInt(t.deliveries)} deliveries, ${fmtInt(t.resends)} re-sends, ` +
      `${fmtInt(d.acks)} acks, ${fmtInt(t.invalid)} invalid packets, ${fmtInt(t.limited)} limit hits`;
    mergeRates(d.rates);
    drawCharts(d.now_ms);
    renderCluster(d.cluster);
  }

  function renderCluster(c) {
    const cluster = c.mode === "cluster";
    $("cluster-mode").textContent = cluster ? `cluster node ${c.node_id}` : c.mode;
    $("cluster-store").hidden = !cluster;
    if (cluster) {
      $("cluster-store").textContent =
        `Store: ${c.store_connected ? "Redis Cluster connected" : "UNREACHABLE"}; pokes ` +
        `${fmtInt(c.pokes.sent)} sent, ${fmtInt(c.pokes.received)} received, ${fmtInt(c.pokes.dropped)} dropped; ` +
        `${fmtInt(c.peer_refused)} peer connections refused`;
    }
    const peers = c.peers || [];
    $("cluster-peers").hidden = peers.length === 0;
    $("cluster-note").textContent = !cluster
      ? "This server runs alone: there are no peers to show. Peers and their state appear here in cluster mode."
      : peers.length === 0
        ? "No link with another node yet: links open with the first poke between nodes (a push for a device another node serves)."
        : "Every node this one had a link with since it started. Links open with the first poke between nodes and carry pokes one way, so a link to a node that stopped shows down at the next poke to it.";
    $("cluster-rows").replaceChildren(
      ...peers.map((p) =>
        el(
          "tr",
          {},
          el("td", { class: "mono" }, String(p.id)),
          el("td", {}, p.state === "up" ? "UP" : "down"),
          el("td", {}, `${fmtDuration(p.since_s)} ago`),
          el("td", {}, `${fmtInt(p.links_up)} / ${fmtInt(p.links_lost)}`)
        )
      )
    );
  }

  function clearData() {
    for (const e of document.querySelectorAll(".card dd, .facts td")) e.textContent = "–";
    resetHistory();
    $("charts").replaceChildren();
    buildCharts();
    $("lookup-result").hidden = true;
    $("lookup-facts").replaceChildren();
    $("lookup-pending").replaceChildren();
    $("push-result").textContent = "";
    $("remove-result").textContent = "";
    current = null;
  }

  async function poll() {
    if (document.hidden) return;
    try {
      let r = await api("GET", "/console/data?since=" + seq);
      if (r.status === 200 && (r.data.rates.seq < seq || r.data.uptime_s < lastUptime)) {
        // The server restarted: its chart numbering did too, so start over from its history.
        resetHistory();
        r = await api("GET", "/console/data?since=0");
      }
      if (r.status !== 200) throw new Error((r.data && r.data.error) || `HTTP ${r.status}`);
      lastUptime = r.data.uptime_s;
      if (!authed) signedIn();
      render(r.data);
      $("live").textContent = "live · updated " + new Date().toLocaleTimeString("en-GB");
    } catch (e) {
      if (!(e instanceof AuthError)) $("live").textContent = "server unreachable (retrying): " + e.message;
    }
  }

  function startPolling() {
    if (pollTimer === null) pollTimer = setInterval(poll, POLL_MS);
  }

  function stopPolling() {
    if (pollTimer !== null) clearInterval(pollTimer);
    pollTimer = null;
  }

  // --- client lookup and removal ---
  async function onLookup(ev) {
    ev.preventDefault();
    // A user name is hashed exactly as typed (the SDKs take MD5 of the name's UTF-8 bytes,
    // spaces included); only a uuid is trimmed.
    const raw = $("lookup-q").value;
    const q = raw.trim();
    let kind = $("lookup-kind").value;
    if (kind === "auto") kind = /^[0-9a-fA-F]{32}$/.test(q) ? "uuid" : "user";
    $("lookup-error").textContent = "";
    $("remove-result").textContent = "";
    $("remove-confirm").hidden = true;
    try {
      const r = await api("POST", "/console/lookup", kind === "uuid" ? { uuid: q } : { user: raw });
      if (r.status === 404) {
        $("lookup-result").hidden = true;
        $("lookup-error").textContent =
          `No record for uuid ${r.data.uuid}` + (r.data.user !== null ? ` (user name "${r.data.user}")` : "") + ".";
        return;
      }
      if (r.status !== 200) throw new Error((r.data && r.data.error) || `HTTP ${r.status}`);
      showRecord(r.data);
    } catch (e) {
      if (!(e instanceof AuthError)) $("lookup-error").textContent = e.message;
    }
  }

  function showRecord(d) {
    current = d;
    const row = (k, v, cls) => el("tr", {}, el("th", { scope: "row" }, k), el("td", cls ? { class: cls } : {}, v));
    const hb =
      d.last_heartbeat_ms === null ? "never" : `${fmtTime(d.last_heartbeat_ms)} (${fmtDuration(d.last_heartbeat_age_s)} ago)`;
    // A cluster node answers with the store's record: its owner, no address or heartbeat
    // (those are the owner's), and each pending item's own age.
    const cluster = d.owner !== undefined;
    const rows = [row("uuid", d.uuid, "mono")];
    if (d.user !== null) rows.push(row("user name", `${d.user} (uuid = MD5 of the name)`));
    if (cluster) {
      rows.push(
        row("owner node", d.owner === null ? "none (no heartbeat bound it yet)" : d.owner, "mono"),
        row("epoch", String(d.epoch)),
        row(
          "state",
          d.owned_here ? (d.online ? "ONLINE here" : "offline here") : "served by its owner (only the owner knows whether it is online)"
        ),
        row("last push", fmtTime(d.last_push_ms))
      );
    } else {
      rows.push(
        row("state", d.online ? "ONLINE (heartbeat within 60 s)" : "offline"),
        row("address", d.addr || "none yet"),
        row("last heartbeat", hb),
        row("last push", fmtTime(d.last_push_ms))
      );
    }
    $("lookup-facts").replaceChildren(...rows);
    const items = d.pending_items.map((it) => {
      const age =
        it.age_s !== undefined
          ? it.age_s === null
            ? "unknown"
            : fmtDuration(it.age_s)
          : it.min_age_s === null
            ? "unknown"
            : `at least ${fmtDuration(it.min_age_s)}`;
      let what, content;
      if (it.type === "0x10") {
        what = "0x10 notification";
        content = el("span", {}, "flag set");
      } else if (it.type === "0x11") {
        what = "0x11 bits";
        content = el("code", {}, it.bits_hex);
      } else {
        what = "0x20 payload";
        content =
          it.text !== null
            ? el("span", {}, el("code", { class: "payload" }, it.text), ` (${it.len} bytes)`)
            : el("span", {}, `binary, ${it.len} bytes: `, el("code", {}, it.hex));
      }
      return el("tr", {}, el("td", {}, what), el("td", {}, content), el("td", {}, age));
    });
    if (items.length === 0) items.push(el("tr", {}, el("td", { colspan: "3" }, "nothing pending")));
    $("lookup-pending").replaceChildren(...items);
    $("lookup-age-note").textContent = cluster
      ? "Age: since the newest push of that type (the store keeps one time per type). Records are shared by every node: removing one is not available in cluster mode."
      : "Age: the record keeps only its newest push time (whole seconds), so each pending item is at least this old.";
    $("remove-row").hidden = cluster;
    $("lookup-result").hidden = false;
  }

  function onRemoveAsk() {
    if (!current) return;
    $("remove-question").textContent =
      `Remove the record of ${current.uuid}? Its pending items are deleted. The device's next heartbeat ` +
      "creates a new, empty record (unless --create-on-heartbeat is false).";
    $("remove-confirm").hidden = false;
    $("remove-no").focus();
  }

  async function onRemoveYes() {
    if (!current) return;
    const uuid = current.uuid;
    $("remove-confirm").hidden = true;
    try {
      const r = await api("POST", `/clients/${uuid}/clear`, {});
      if (r.status === 200) {
        $("lookup-result").hidden = true;
        current = null;
        $("remove-result").textContent = `Removed the record of ${uuid}.`;
      } else {
        $("remove-result").textContent = `Not removed: ${(r.data && r.data.error) || "HTTP " + r.status}.`;
      }
    } catch (e) {
      if (!(e instanceof AuthError)) $("remove-result").textContent = "Not removed: " + e.message;
    }
  }

  // --- push ---
  function onPushType() {
    const t = $("push-type").value;
    $("push-bits-row").hidden = t !== "bits";
    $("push-text-row").hidden = t !== "payload";
  }

  function onPushText() {
    const n = new TextEncoder().encode($("push-text").value).length;
    $("push-text-len").textContent = `${n} bytes` + (n > 500 ? " (too long: the server rejects more than 500)" : "");
  }

  async function onPush(ev) {
    ev.preventDefault();
    const to = document.querySelector('input[name="to"]:checked').value;
    // As in the lookup: a user name exactly as typed, a uuid trimmed.
    const target = to === "uuid" ? $("push-target").value.trim() : $("push-target").value;
    const type = $("push-type").value;
    // The body is written by hand so a 64-bit mask keeps every bit (JSON.stringify would go
    // through a double).
    let body = `{${JSON.stringify(to)}:${JSON.stringify(target)},"type":${JSON.stringify(type)}`;
    if (type === "bits") {
      let bits;
      try {
        bits = BigInt($("push-bits").value.trim());
      } catch (_) {
        bits = -1n;
      }
      if (bits <= 0n || bits >= 1n << 64n) {
        $("push-result").textContent = "Bits must be a number from 1 to 2^64-1 (decimal or 0x hex).";
        return;
      }
      body += `,"bits":${bits.toString()}`;
    } else if (type === "payload") {
      body += `,"text":${JSON.stringify($("push-text").value)}`;
    }
    body += "}";
    $("push-result").textContent = "sending…";
    try {
      const r = await api("POST", "/push", body);
      const d = r.data || {};
      if (r.status !== 200) throw new Error(d.error || `HTTP ${r.status}`);
      const label = { notify: "0x10", bits: "0x11", payload: "0x20" }[type];
      $("push-result").textContent =
        d.result === "accepted"
          ? `Accepted: ${label} for uuid ${d.uuid} (journaled, like a 0x00 reply); sent now if the device is online, else on its next heartbeat.`
          : d.result === "rejected"
            ? `Rejected (reply 0x01): ${label} for uuid ${d.uuid}.`
            : `Invalid: ${d.error}`;
    } catch (e) {
      if (!(e instanceof AuthError)) $("push-result").textContent = "Not sent: " + e.message;
    }
  }

  // --- start ---
  function start() {
    buildCharts();
    $("login-form").addEventListener("submit", onLogin);
    $("lookup-form").addEventListener("submit", onLookup);
    $("remove").addEventListener("click", onRemoveAsk);
    $("remove-yes").addEventListener("click", onRemoveYes);
    $("remove-no").addEventListener("click", () => {
      $("remove-confirm").hidden = true;
    });
    $("push-form").addEventListener("submit", onPush);
    $("push-type").addEventListener("change", onPushType);
    $("push-text").addEventListener("input", onPushText);
    $("logout").addEventListener("click", () => showLogin(""));
    window.addEventListener("hashchange", route);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && authed) poll();
    });
    onPushType();
    poll().then(() => {
      if (authed) startPolling();
    });
  }

  start();
})();
