// The forwarder's page: polls the JSON API once a second and updates the tables in place.
// Every piece of data reaches the DOM through textContent or attributes, never as HTML, so a
// rule named "<img onerror=...>" is shown as text. No external assets: the lab has no internet.
'use strict';

(() => {
  const REFRESH_MS = 1000;
  // Charts show up to 5 minutes, and at least one, so a fresh forwarder's chart is not a sliver.
  const CHART_MAX_SPAN_MS = 300_000;
  const CHART_MIN_SPAN_MS = 60_000;
  const CONNECTION_ROWS = 200;
  const LIST_EVERY_SECOND_UP_TO = 5000;

  const $ = (id) => document.getElementById(id);

  /** Creates an element; strings among the children become text nodes. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'class') node.className = value;
      else if (key === 'text') node.textContent = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function setText(node, text) {
    const s = String(text);
    if (node.textContent !== s) node.textContent = s;
  }

  // ---- formatting ---------------------------------------------------------------------------

  const fmtInt = (n) => Number(n || 0).toLocaleString('en-US');

  function fmtBytes(n) {
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let v = Number(n || 0);
    let i = 0;
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i += 1;
    }
    const digits = i === 0 || v >= 100 ? 0 : 1;
    return `${v.toFixed(digits)} ${units[i]}`;
  }

  const fmtRate = (n) => `${fmtBytes(n)}/s`;

  function fmtDuration(ms) {
    const s = Math.max(0, Math.floor(ms / 1000));
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${s % 60} s`;
    const h = Math.floor(m / 60);
    if (h < 24) return `${h} h ${m % 60} min`;
    return `${Math.floor(h / 24)} d ${h % 24} h`;
  }

  /** "20 Mbit/s" from bits per second. */
  function fmtBits(n) {
    const units = [[1e9, 'Gbit/s'], [1e6, 'Mbit/s'], [1e3, 'kbit/s']];
    for (const [scale, unit] of units) {
      if (n >= scale) return `${Number((n / scale).toFixed(2))} ${unit}`;
    }
    return `${n} bit/s`;
  }

  /** A pool's bandwidth limits and what they held back, as parts of its summary line. */
  function limitParts(l) {
    const r = l.rates || {};
    const scopes = [['conn', 'per connection'], ['ip', 'per client'], ['pool', 'for the pool']];
    const limits = [];
    for (const [k, words] of scopes) {
      const up = r[`${k}_up`];
      const down = r[`${k}_down`];
      if (up) limits.push(`up ${fmtBits(up)} ${words}`);
      if (down) limits.push(`down ${fmtBits(down)} ${words}`);
    }
    if (!limits.length) return [];
    const parts = [`limited: ${limits.join(', ')}`];
    if (l.throttled_ms) parts.push(`held back ${fmtDuration(l.throttled_ms)} (${fmtBytes(l.throttled_bytes)} delayed)`);
    if (l.rate_drops) parts.push(`${fmtInt(l.rate_drops)} datagrams over the limit dropped`);
    return parts;
  }

  /** "Connection refused (os error 111)" -> "connection refused". */
  function plainError(text) {
    const t = String(text || '').replace(/\s*\(os error \d+\)$/, '');
    return t ? t.charAt(0).toLowerCase() + t.slice(1) : t;
  }

  function portOf(listen, raw) {
    if (!listen) return raw;
    const i = listen.lastIndexOf(':');
    return i >= 0 ? listen.slice(i + 1) : listen;
  }

  // ---- state --------------------------------------------------------------------------------

  const state = {
    rules: null,
    etag: null,
    stats: null,
    history: null,
    conns: [],
    connTotal: 0,
    selected: new Set(),
    structure: '',
    rows: new Map(),
    pools: new Map(),
    connRows: new Map(),
    editing: null,
    dialogEtag: null,
    confirmEtag: null,
    notInForceSince: 0,
    online: null,
    token: null,
  };

  // The token lives in sessionStorage, never in a cookie: storage is per origin (scheme, host and
  // port), so what the https:// page stored is out of reach of any http:// page, and the browser
  // never sends it anywhere by itself. It is the cookie's Secure flag, by construction.
  try {
    state.token = sessionStorage.getItem('forwarder-token');
  } catch (_) {
    state.token = null;
  }
  {
    const m = location.hash.match(/token=([^&]+)/);
    if (m) {
      state.token = decodeURIComponent(m[1]);
      try {
        sessionStorage.setItem('forwarder-token', state.token);
      } catch (_) { /* private mode: keep it for this page only */ }
      history.replaceState(null, '', location.pathname + location.search);
    }
  }

  // ---- API ----------------------------------------------------------------------------------

  async function api(method, path, body, ifMatch) {
    const headers = {};
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (ifMatch) headers['If-Match'] = ifMatch;
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    const res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
    let data = null;
    try {
      data = await res.json();
    } catch (_) {
      data = null;
    }
    return { status: res.status, ok: res.ok, data, etag: res.headers.get('ETag') };
  }

  /** A change: asks for the token once when the forwarder wants one. */
  async function mutate(method, path, body, ifMatch) {
    let res = await api(method, path, body, ifMatch);
    if (res.status === 401) {
      const token = await askToken();
      if (token) {
        state.token = token;
        try {
          sessionStorage.setItem('forwarder-token', token);
        } catch (_) { /* keep it in memory */ }
        res = await api(method, path, body, ifMatch);
      }
    }
    return res;
  }

  async function getJSON(path) {
    const res = await fetch(path, { cache: 'no-store' });
    if (!res.ok) throw new Error(`${path}: HTTP ${res.status}`);
    return { data: await res.json(), res };
  }

  async function refreshRules(force) {
    const headers = {};
    if (state.etag && !force) headers['If-None-Match'] = state.etag;
    const res = await fetch('/api/rules', { headers, cache: 'no-store' });
    if (res.status === 304) return;
    if (!res.ok) throw new Error(`/api/rules: HTTP ${res.status}`);
    setRules(await res.json(), res.headers.get('ETag'));
  }

  function setRules(doc, etag) {
    state.rules = doc;
    state.etag = etag || `"${doc.version}"`;
    const ids = new Set(doc.entries.map((e) => e.id));
    for (const id of [...state.selected]) if (!ids.has(id)) state.selected.delete(id);
    render();
  }

  // ---- the refresh loop ---------------------------------------------------------------------

  async function tick() {
    // Listing connections asks every worker for all of them: with thousands open, every 5 s.
    state.ticks = (state.ticks || 0) + 1;
    const listConnections = state.connTotal <= LIST_EVERY_SECOND_UP_TO || state.ticks % 5 === 1;
    try {
      const [stats, hist, conns] = await Promise.all([
        getJSON('/api/stats'),
        getJSON('/api/history'),
        listConnections ? getJSON(`/api/connections?limit=${CONNECTION_ROWS}`) : null,
        refreshRules(false),
      ]);
      state.stats = stats.data;
      state.history = hist.data;
      if (conns) {
        state.conns = conns.data;
        state.connTotal = Number(conns.res.headers.get('X-Total-Count') || conns.data.length);
      }
      setOnline(true);
    } catch (e) {
      setOnline(false, e);
    }
    render();
    setTimeout(tick, REFRESH_MS);
  }

  function setOnline(online, error) {
    if (state.online === online) return;
    state.online = online;
    const pill = $('live-pill');
    pill.classList.toggle('live', online);
    pill.classList.toggle('offline', !online);
    setText($('live-text'), online ? 'live' : 'offline');
    pill.title = online ? 'Figures refresh every second' : `Cannot reach the forwarder: ${error}`;
  }

  // ---- lookups ------------------------------------------------------------------------------

  function statsPool(listen) {
    // Pools are named like the rows' listen field: `0.0.0.0:53/udp` for a UDP pool.
    return state.stats ? state.stats.pools.find((p) => (p.label || p.listen) === listen) : undefined;
  }

  function statsBackend(entry) {
    const pool = statsPool(entry.listen);
    if (!pool) return undefined;
    const members = pool.backends.filter(
      (b) => b.name === entry.name && b.dest_ip === entry.dest_ip && b.dest_port === entry.dest_port,
    );
    if (members.length <= 1) return members[0];
    // A host name with several addresses: one row, its members' figures summed.
    const merged = { ...members[0] };
    for (const k of ['active', 'total', 'bytes_up', 'bytes_down', 'connect_failures', 'datagrams_up', 'datagrams_down']) {
      merged[k] = members.reduce((a, b) => a + (b[k] || 0), 0);
    }
    merged.state = members.some((b) => b.state === 'up') ? 'up' : members.some((b) => b.state === 'down') ? 'down' : 'unknown';
    merged.members = members.length;
    return merged;
  }

  function historyOf(listen, backend) {
    const h = state.history;
    if (!h) return [];
    if (!backend) {
      const s = h.pools.find((p) => p.listen === listen);
      return s ? s.points : [];
    }
    const s = h.backends.find(
      (b) => b.listen === listen && b.name === backend.name && b.addr === backend.addr,
    );
    return s ? s.points : [];
  }

  /** The file's rows grouped by listening address, in file order. */
  function groups() {
    const map = new Map();
    for (const entry of state.rules ? state.rules.entries : []) {
      const key = entry.listen || `invalid:${entry.listen_port}`;
      if (!map.has(key)) map.set(key, { key, listen: entry.listen, raw: entry.listen_port, entries: [] });
      map.get(key).entries.push(entry);
    }
    return [...map.values()];
  }

  function rowErrors(id) {
    return state.rules ? state.rules.errors.filter((e) => e.id === id) : [];
  }

  // ---- rendering ----------------------------------------------------------------------------

  function render() {
    if (!state.rules) return;
    renderHeader();
    renderBanner();
    const key = JSON.stringify([
      state.rules.version,
      state.rules.in_force,
      (state.stats ? state.stats.pools : []).map((p) => [p.listen, p.backends.map((b) => [b.name, b.addr])]),
    ]);
    if (key !== state.structure) {
      state.structure = key;
      buildRules();
    }
    updateRules();
    renderSummary();
    renderConnections();
    renderFile();
  }

  function renderHeader() {
    setText($('file-label'), state.rules.file);
    const s = state.stats;
    if (!s) return;
    const workers = `${s.workers} worker${s.workers === 1 ? '' : 's'}`;
    const text = $('capacity-text');
    const hasUdp = s.pools.some((p) => p.proto === 'udp');
    const udp = hasUdp ? ` · ≈ ${fmtInt(s.udp_capacity)} UDP sessions, ${fmtInt(s.udp_sessions)} live` : '';
    const dp = s.data_path;
    const wanted = `≈ ${fmtInt(s.capacity)} connections with ${workers}, ${fmtInt(s.active)} in use${udp} · ${dp.path}`;
    if (text.dataset.shown !== wanted) {
      text.dataset.shown = wanted;
      // The data path chosen at start; the reason (calibration figures) on hover.
      $('capacity').title = `Connections the worker processes can hold within the open-file limit. Data path: ${dp.path} (${dp.reason})`;
      text.replaceChildren(
        '≈ ', el('b', { text: fmtInt(s.capacity) }), ` connections with ${workers}, `,
        el('b', { text: fmtInt(s.active) }), ' in use',
        ...(hasUdp ? [' · ≈ ', el('b', { text: fmtInt(s.udp_capacity) }), ' UDP sessions, ',
          el('b', { text: fmtInt(s.udp_sessions) }), ' live'] : []),
        ' · data path ', el('b', { text: dp.path }), dp.asked === 'auto' ? ' (auto)' : '',
      );
    }
    const pct = s.capacity ? Math.min(100, (100 * s.active) / s.capacity) : 0;
    $('capacity-fill').style.width = `${s.active > 0 ? Math.max(pct, 1) : 0}%`;
    setText($('uptime'), `up ${fmtDuration(s.uptime_ms)}`);
    document.title = `forwarder · ${fmtInt(s.active)} active`;
    renderTransport(s.web);
    renderWebGuard(s.web && s.web.connections);
  }

  /** Connections to this page that its limits refused or cut (a slowloris shows here). */
  function renderWebGuard(c) {
    const box = $('web-guard');
    if (!c) return;
    const parts = [
      [c.refused_per_address, 'refused (too many from one address)'],
      [c.refused_full, 'refused (page full)'],
      [c.cut_head_timeout, 'cut (request head too slow)'],
      [c.cut_body_timeout, 'cut (request body too slow)'],
      [c.cut_head_too_large, 'cut (request head too large)'],
      [c.cut_handshake_timeout, 'cut (TLS handshake too slow)'],
      [c.cut_stalled, 'cut (stalled)'],
    ].filter(([n]) => n > 0).map(([n, what]) => `${fmtInt(n)} ${what}`);
    const wanted = parts.length ? `This page: ${fmtInt(c.open)} connections open · ${parts.join(' · ')}` : '';
    setText(box, wanted);
    box.hidden = !wanted;
  }

  /** Says so when the page, its token and the rules cross the network unencrypted. */
  function renderTransport(web) {
    const banner = $('transport-banner');
    const warning = web && web.warning;
    if (banner.dataset.shown === (warning || '')) return;
    banner.dataset.shown = warning || '';
    if (warning) {
      banner.replaceChildren(el('b', { text: 'This page is served over plain HTTP: ' }), warning, '.');
    }
    banner.hidden = !warning;
  }

  function renderBanner() {
    const banner = $('banner');
    const doc = state.rules;
    // The forwarder runs as a user (--user, systemd's User=) that cannot write the rules file.
    const writeBanner = $('write-banner');
    setText(writeBanner, doc.write_problem || '');
    writeBanner.hidden = !doc.write_problem;
    const now = Date.now();
    if (doc.in_force) state.notInForceSince = 0;
    else if (!state.notInForceSince) state.notInForceSince = now;
    const shownKey = JSON.stringify([doc.version, doc.errors.length, doc.in_force && 1, now - state.notInForceSince > 2000, doc.apply_error]);
    if (banner.dataset.key === shownKey) return;
    banner.dataset.key = shownKey;
    if (doc.errors.length) {
      banner.className = 'banner error';
      banner.replaceChildren(
        el('b', { text: `${doc.file} has ${doc.errors.length} error${doc.errors.length === 1 ? '' : 's'}` }),
        ' — the previous rules stay in force until it is fixed (here or in the file):',
        el('ul', null, ...doc.errors.map((e) => el('li', { text: `line ${e.line}: ${e.field}: ${e.message}` }))),
      );
      banner.hidden = false;
    } else if (!doc.in_force && now - state.notInForceSince > 2000) {
      banner.className = 'banner warn';
      banner.replaceChildren(
        el('b', { text: 'The rules file is not in force. ' }),
        doc.apply_error
          ? 'Its rules could not be applied; the previous rules keep running:'
          : 'Its rules could not be applied (a port may be in use: see the forwarder\'s log); the previous rules keep running.',
        ...(doc.apply_error ? [el('pre', { text: doc.apply_error })] : []),
      );
      banner.hidden = false;
    } else {
      banner.hidden = true;
    }
  }

  function buildRules() {
    const table = $('rules-table');
    for (const tbody of table.querySelectorAll('tbody.pool')) tbody.remove();
    state.rows.clear();
    state.pools.clear();
    const gs = groups();
    $('rules-empty').hidden = gs.length > 0;
    for (const g of gs) {
      const tbody = el('tbody', { class: 'pool', 'data-listen': g.listen || '' });
      const canvas = el('canvas', { class: 'pool-canvas', 'aria-label': 'connections and throughput over the last minutes' });
      const meta = el('div', { class: 'pool-meta' });
      const legendConns = el('b');
      const legendBytes = el('b');
      const legendSpan = el('span', { class: 'small' });
      const head = el('tr', { class: 'pool-head' },
        el('td', { colspan: 12 },
          el('div', { class: 'pool-line' },
            el('div', { class: 'pool-title' },
              el('div', { class: 'port' }, `Port ${portOf(g.listen, g.raw)}`, el('span', { class: 'addr', text: g.listen || g.raw })),
              meta),
            el('div', { class: 'pool-chart' },
              canvas,
              el('div', { class: 'legend' },
                el('span', null, el('span', { class: 'swatch conns' }), legendConns, isUdp(g.listen) ? ' sessions' : ' connections'),
                el('span', null, el('span', { class: 'swatch bytes' }), legendBytes, ' throughput'),
                legendSpan)))));
      tbody.append(head);
      state.pools.set(g.key, { group: g, canvas, meta, legendConns, legendBytes, legendSpan });
      for (const entry of g.entries) tbody.append(buildEntryRow(entry));
      table.append(tbody);
    }
    syncSelection();
  }

  function buildEntryRow(entry) {
    const checkbox = el('input', { type: 'checkbox', 'aria-label': `Select ${entry.name}` });
    checkbox.checked = state.selected.has(entry.id);
    checkbox.addEventListener('change', () => {
      if (checkbox.checked) state.selected.add(entry.id);
      else state.selected.delete(entry.id);
      syncSelection();
    });
    const errors = rowErrors(entry.id);
    const badge = el('span', { class: 'badge idle', text: '…' });
    const reason = el('div', { class: 'reason' });
    const cells = {
      active: el('td', { class: 'num active' }),
      total: el('td', { class: 'num total' }),
      up: el('td', { class: 'num bytes-up' }),
      down: el('td', { class: 'num bytes-down' }),
      failures: el('td', { class: 'num failures' }),
    };
    const shareFill = el('div', { class: 'share-fill' });
    const shareText = el('span', { class: 'share-text' });
    const spark = el('canvas', { 'aria-label': 'throughput over the last minutes' });
    const edit = el('button', { type: 'button', class: 'btn link small', text: 'Edit', title: `Edit ${entry.name}` });
    edit.addEventListener('click', () => openEntryDialog(entry));
    // Drain / disable / back in service: written to the rules file as the row's option.
    const adminButtons = ['active', 'drain', 'disabled'].map((want) => {
      const label = { active: 'Enable', drain: 'Drain', disabled: 'Disable' }[want];
      const b = el('button', { type: 'button', class: 'btn link small admin', 'data-admin': want, text: label, title: `${label} ${entry.name}` });
      b.addEventListener('click', () => setAdmin(entry, want));
      return b;
    });
    const tr = el('tr', { class: `entry${errors.length ? ' invalid' : ''}`, 'data-id': entry.id, 'data-name': entry.name },
      el('td', { class: 'check' }, checkbox),
      el('td', { class: 'name', title: entry.name }, entry.name, el('span', { class: 'line-no', text: `line ${entry.line}` })),
      el('td', null,
        el('div', { class: 'dest', text: `${entry.dest_ip}:${entry.dest_port}` }),
        ...(entry.options ? [el('div', { class: 'options', text: entry.options, title: 'rule options' })] : []),
        ...errors.map((e) => el('div', { class: 'row-error', text: `${e.field}: ${e.message}` }))),
      el('td', { class: 'health' }, badge, reason),
      cells.active,
      cells.total,
      el('td', null, el('div', { class: 'share' }, el('div', { class: 'share-bar' }, shareFill), shareText)),
      cells.up,
      cells.down,
      cells.failures,
      el('td', { class: 'spark' }, spark),
      el('td', { class: 'edit-col' }, edit, ...adminButtons));
    tr.addEventListener('click', (ev) => {
      if (ev.target.closest('button, input, a')) return;
      checkbox.checked = !checkbox.checked;
      checkbox.dispatchEvent(new Event('change'));
    });
    state.rows.set(entry.id, { entry, tr, checkbox, badge, reason, cells, shareFill, shareText, spark, adminButtons });
    return tr;
  }

  async function setAdmin(entry, want) {
    try {
      const res = await mutate('PUT', `/api/rules/${encodeURIComponent(entry.id)}/state`, { state: want }, state.etag);
      if (res.ok) {
        setRules(res.data, res.etag);
        toast(`${entry.name}: ${want === 'active' ? 'back in service' : want}`);
      } else {
        if (res.status === 412) await refreshRules(true);
        toast(`${entry.name}: ${(res.data && res.data.error) || `HTTP ${res.status}`}`, true);
      }
    } catch (e) {
      toast(`Cannot reach the forwarder: ${e.message}`, true);
    }
  }

  function syncSelection() {
    for (const [id, row] of state.rows) {
      const on = state.selected.has(id);
      row.checkbox.checked = on;
      row.tr.classList.toggle('selected', on);
    }
    const n = state.selected.size;
    const button = $('delete-selected');
    button.disabled = n === 0;
    setText(button, n ? `Delete selected (${n})` : 'Delete selected');
    const all = $('select-all');
    all.checked = n > 0 && n === state.rows.size;
    all.indeterminate = n > 0 && n < state.rows.size;
  }

  function healthOf(b, now) {
    if (b.state === 'unknown') {
      return { text: `not known yet: nothing tried · check: ${b.check || 'none'}`, bad: false, title: 'no connection, reply or check has told anything about this backend yet' };
    }
    if (b.state === 'down') {
      const parts = [plainError(b.last_error) || 'unreachable'];
      if (b.dns && b.dns !== b.last_error) parts.push(b.dns);
      if (b.down_since_ms) parts.push(`down for ${fmtDuration(now - b.down_since_ms)}`);
      if (b.retry_at_ms) parts.push(b.retry_at_ms > now ? `next try in ${fmtDuration(b.retry_at_ms - now + 999)}` : 'next try on the next connection');
      if (b.rise) parts.push(`${b.rise} of 2 good checks`);
      return { text: parts.join(' · '), bad: true, title: b.last_error };
    }
    const parts = [];
    if (b.last_error && b.last_error_ms) parts.push(`last failure ${fmtDuration(now - b.last_error_ms)} ago: ${plainError(b.last_error)}`);
    if (b.last_check_ms) parts.push(`checked ${fmtDuration(now - b.last_check_ms)} ago`);
    if (b.slowstart_pct != null) parts.push(`slow start: ${b.slowstart_pct}% of its weight`);
    if (b.check) parts.push(`check: ${b.check}`);
    if (b.dns) parts.push(b.members ? `${b.dns} (${b.members} members)` : b.dns);
    return { text: parts.join(' · '), bad: false, title: b.last_error || '' };
  }

  function updateRules() {
    const now = state.stats ? state.stats.now_ms : Date.now();
    for (const row of state.rows.values()) {
      const b = statsBackend(row.entry);
      if (!b) {
        row.badge.className = 'badge idle';
        setText(row.badge, 'not running');
        setText(row.reason, state.rules.in_force ? 'starting…' : 'not in force: see the message above');
        for (const c of Object.values(row.cells)) setText(c, '–');
        row.shareFill.style.width = '0';
        setText(row.shareText, '');
        drawChart(row.spark, [], { width: 80, height: 24 });
        continue;
      }
      const admin = b.admin && b.admin !== 'active' ? b.admin : '';
      row.badge.className = `badge ${admin ? 'idle' : { down: 'down', up: 'up' }[b.state] || 'idle'}`;
      setText(row.badge, [b.backup ? 'backup' : '', admin, b.state].filter(Boolean).join(' · '));
      row.badge.title = admin ? `${admin}: no new connections; open ones run to their end` : `health: ${b.state}`;
      for (const button of row.adminButtons) button.hidden = button.dataset.admin === (b.admin || 'active');
      const health = healthOf(b, now);
      setText(row.reason, health.text);
      row.reason.className = `reason${health.bad ? ' bad' : ''}`;
      row.reason.title = health.title;
      setText(row.cells.active, fmtInt(b.active));
      setText(row.cells.total, fmtInt(b.total));
      setText(row.cells.up, fmtBytes(b.bytes_up));
      setText(row.cells.down, fmtBytes(b.bytes_down));
      setText(row.cells.failures, fmtInt(b.connect_failures));
      row.cells.failures.classList.toggle('bad', b.connect_failures > 0);
      const pool = statsPool(row.entry.listen);
      const sum = pool ? pool.backends.reduce((a, x) => a + x.total, 0) : 0;
      const pct = sum ? (100 * b.total) / sum : 0;
      row.shareFill.style.width = `${pct}%`;
      setText(row.shareText, sum ? `${pct.toFixed(0)}%` : '–');
      row.shareText.parentElement.title = sum ? `${fmtInt(b.total)} of ${fmtInt(sum)} connections of this pool` : 'no connections yet';
      drawChart(row.spark, historyOf(row.entry.listen, b), { width: 80, height: 24 });
    }
    for (const pool of state.pools.values()) {
      const g = pool.group;
      const s = statsPool(g.listen);
      const n = g.entries.length;
      const parts = [n > 1 ? `round robin over ${n} backends` : 'one backend'];
      const udp = isUdp(g.listen);
      if (s) parts.push(udp ? `${fmtInt(s.accepted)} sessions` : `${fmtInt(s.accepted)} accepted`);
      if (s && s.evicted) parts.push(`${fmtInt(s.evicted)} evicted`);
      if (s && s.limits) parts.push(...limitParts(s.limits));
      if (s && s.backends.some((b) => b.backup)) parts.push(`serving: ${s.serving === 'none' ? 'no tier can take connections' : `${s.serving}s`}`);
      if (s && udp) {
        const sum = (k) => s.backends.reduce((a, b) => a + (b[k] || 0), 0);
        parts.push(`${fmtInt(sum('datagrams_up'))} datagrams in, ${fmtInt(sum('datagrams_down'))} out`);
        const drops = sum('drops_up') + sum('drops_down');
        if (drops) parts.push(`${fmtInt(drops)} dropped (full buffer)`);
      }
      const unrouted = s && s.unrouted ? `${fmtInt(s.unrouted)} unrouted` : '';
      const r = (s && s.refused) || {};
      const refusedBy = [['denied', r.denied], ['max_conns', r.max_conns], ['max_conns_per_ip', r.max_conns_per_ip], ['PROXY header', r.proxy_header], ['no SNI route', r.no_sni_route], ['TLS hello', r.tls_hello]]
        .filter(([, n]) => n > 0);
      if (refusedBy.length) parts.push(`${fmtInt(refusedBy.reduce((a, [, n]) => a + n, 0))} refused (${refusedBy.map(([k, n]) => `${k} ${fmtInt(n)}`).join(', ')})`);
      const metaKey = parts.join(' · ') + unrouted;
      if (pool.meta.dataset.key !== metaKey) {
        pool.meta.dataset.key = metaKey;
        const why = udp ? 'datagrams dropped because no session could be made' : 'closed because no backend could be reached';
        pool.meta.replaceChildren(parts.join(' · '), unrouted ? ' · ' : '', unrouted ? el('span', { class: 'warn', text: unrouted, title: why }) : '');
      }
      const points = historyOf(g.listen);
      const last = points.length ? points[points.length - 1] : null;
      setText(pool.legendConns, last ? fmtInt(last[1]) : '0');
      setText(pool.legendBytes, fmtRate(last ? last[3] + last[4] : 0));
      setText(pool.legendSpan, `last ${Math.round(chartSpan(points) / 60_000)} min`);
      drawChart(pool.canvas, points, { width: 300, height: 54, labels: true });
    }
  }

  function renderSummary() {
    const s = state.stats;
    const h = state.history;
    if (!s) return;
    let up = 0;
    let all = 0;
    let total = 0;
    for (const p of s.pools) {
      for (const b of p.backends) {
        all += 1;
        if (b.state === 'up') up += 1;
        total += b.total;
      }
    }
    setText($('sum-active'), fmtInt(s.active));
    const ports = `${s.pools.length} listening port${s.pools.length === 1 ? '' : 's'}`;
    // Connections a crashed or killed worker held: gone, so no longer active, but worth seeing.
    const lost = s.lost_worker_died ? ` · ${fmtInt(s.lost_worker_died)} lost with a dead worker` : '';
    setText($('sum-active-note'), ports + lost);
    let rate = 0;
    let bytesUp = 0;
    let bytesDown = 0;
    if (h) {
      // New connections: average of the last 5 seconds; bytes: the last second.
      const lastT = Math.max(0, ...h.pools.map((p) => (p.points.length ? p.points[p.points.length - 1][0] : 0)));
      for (const p of h.pools) {
        const recent = p.points.filter((pt) => pt[0] > lastT - 5000);
        rate += recent.reduce((a, pt) => a + pt[2], 0) / 5;
        const last = p.points[p.points.length - 1];
        if (last && last[0] === lastT) {
          bytesUp += last[3];
          bytesDown += last[4];
        }
      }
    }
    setText($('sum-rate'), `${rate < 10 ? rate.toFixed(1) : fmtInt(Math.round(rate))}/s`);
    setText($('sum-total'), `${fmtInt(total)} since start`);
    setText($('sum-bytes'), fmtRate(bytesUp + bytesDown));
    setText($('sum-bytes-note'), `↑ ${fmtRate(bytesUp)}  ↓ ${fmtRate(bytesDown)}`);
    setText($('sum-health'), `${up} / ${all}`);
    const health = $('sum-health-note');
    setText(health, all === up ? (all ? 'all healthy' : 'no backends') : `${all - up} down`);
    health.style.color = all === up ? '' : 'var(--red)';
  }

  function renderConnections() {
    const body = $('conns-body');
    const seen = new Set();
    const order = [];
    for (const c of state.conns) {
      let row = state.connRows.get(c.id);
      if (!row) row = buildConnRow(c);
      const halves = [c.client_half_closed ? 'client' : '', c.backend_half_closed ? 'backend' : ''].filter(Boolean);
      setText(row.cells.up, fmtBytes(c.bytes_up));
      setText(row.cells.down, fmtBytes(c.bytes_down));
      setText(row.cells.age, fmtDuration(c.age_ms));
      setText(row.cells.state, c.state);
      row.cells.state.className = `state-tag ${c.state}`;
      setText(row.cells.half, halves.length ? halves.join(', ') : '–');
      seen.add(c.id);
      order.push(row.tr);
    }
    for (const [id, row] of state.connRows) {
      if (!seen.has(id)) {
        row.tr.remove();
        state.connRows.delete(id);
      }
    }
    const current = [...body.children];
    if (current.length !== order.length || current.some((tr, i) => tr !== order[i])) body.replaceChildren(...order);
    $('conns-empty').hidden = state.conns.length > 0;
    const shown = state.conns.length;
    setText($('conns-note'), state.connTotal > shown
      ? `${fmtInt(state.connTotal)} open through every worker; showing the ${fmtInt(shown)} oldest.`
      : `${fmtInt(state.connTotal)} open through every worker.`);
  }

  function buildConnRow(c) {
    const cells = {
      up: el('td', { class: 'num' }),
      down: el('td', { class: 'num' }),
      age: el('td', { class: 'num' }),
      state: el('span', { class: 'state-tag' }),
      half: el('td'),
    };
    const close = el('button', { type: 'button', class: 'btn danger small', text: 'Close', title: 'Reset this connection on both sides' });
    close.addEventListener('click', async () => {
      close.disabled = true;
      const res = await mutate('DELETE', `/api/connections/${encodeURIComponent(c.id)}`);
      if (res.ok) {
        toast(`Closed the connection from ${c.client}`);
        const row = state.connRows.get(c.id);
        if (row) row.tr.remove();
        state.connRows.delete(c.id);
        state.conns = state.conns.filter((x) => x.id !== c.id);
      } else {
        close.disabled = false;
        toast((res.data && res.data.error) || `Close failed (HTTP ${res.status})`, true);
      }
    });
    const tr = el('tr', { 'data-id': c.id, 'data-rule': c.rule },
      el('td', { class: 'mono', text: c.client }),
      el('td', { text: c.rule }),
      el('td', { class: 'mono', text: c.listen }),
      el('td', { class: 'mono', text: c.backend }),
      el('td', null, cells.state),
      cells.up, cells.down, cells.age, cells.half,
      el('td', null, close));
    const row = { tr, cells };
    state.connRows.set(c.id, row);
    return row;
  }

  function renderFile() {
    const doc = state.rules;
    setText($('file-text'), doc.text || '(empty file)');
    setText($('file-summary'), `${doc.file} · ${doc.entries.length} entr${doc.entries.length === 1 ? 'y' : 'ies'} · version ${doc.version}`);
  }

  // ---- charts -------------------------------------------------------------------------------

  function chartSpan(points) {
    if (!points.length) return CHART_MIN_SPAN_MS;
    const have = points[points.length - 1][0] - points[0][0];
    return Math.min(CHART_MAX_SPAN_MS, Math.max(CHART_MIN_SPAN_MS, have));
  }

  /** Throughput as a filled area and active connections as a line, over the last 5 minutes. */
  function drawChart(canvas, points, { width, height, labels }) {
    const dpr = window.devicePixelRatio || 1;
    const size = `${width}x${height}@${dpr}`;
    if (canvas.dataset.size !== size) {
      canvas.dataset.size = size;
      canvas.width = Math.round(width * dpr);
      canvas.height = Math.round(height * dpr);
      canvas.style.width = `${width}px`;
      canvas.style.height = `${height}px`;
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const top = labels ? 14 : 3;
    const bottom = height - 2;
    ctx.strokeStyle = '#eef0f3';
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(0, Math.round((top + bottom) / 2) + 0.5);
    ctx.lineTo(width, Math.round((top + bottom) / 2) + 0.5);
    ctx.stroke();
    if (!points.length) return;
    const span = chartSpan(points);
    const end = points[points.length - 1][0];
    const start = end - span;
    const x = (t) => ((t - start) / span) * width;
    const maxBytes = Math.max(1, ...points.map((p) => p[3] + p[4]));
    const maxConns = Math.max(1, ...points.map((p) => p[1]));
    const yBytes = (v) => bottom - (v / maxBytes) * (bottom - top);
    const yConns = (v) => bottom - (v / maxConns) * (bottom - top);

    ctx.beginPath();
    ctx.moveTo(x(points[0][0]), bottom);
    for (const p of points) ctx.lineTo(x(p[0]), yBytes(p[3] + p[4]));
    ctx.lineTo(x(end), bottom);
    ctx.closePath();
    ctx.fillStyle = 'rgba(37, 99, 235, 0.16)';
    ctx.fill();
    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), yBytes(p[3] + p[4])) : ctx.moveTo(x(p[0]), yBytes(p[3] + p[4]))));
    ctx.strokeStyle = 'rgba(37, 99, 235, 0.7)';
    ctx.lineWidth = 1;
    ctx.stroke();

    ctx.beginPath();
    points.forEach((p, i) => {
      const px = x(p[0]);
      const py = yConns(p[1]);
      if (i === 0) ctx.moveTo(px, py);
      else {
        ctx.lineTo(px, yConns(points[i - 1][1]));
        ctx.lineTo(px, py);
      }
    });
    ctx.strokeStyle = '#7c3aed';
    ctx.lineWidth = 1.6;
    ctx.stroke();

    if (labels) {
      ctx.font = '10px system-ui, "DejaVu Sans", sans-serif';
      ctx.textBaseline = 'top';
      ctx.fillStyle = '#2563eb';
      ctx.fillText(`max ${fmtRate(maxBytes)}`, 4, 2);
      ctx.fillStyle = '#7c3aed';
      const label = `max ${fmtInt(maxConns)} conn`;
      ctx.fillText(label, width - ctx.measureText(label).width - 4, 2);
    }
  }

  // ---- dialogs ------------------------------------------------------------------------------

  const FIELDS = ['name', 'listen_port', 'dest_ip', 'dest_port', 'options'];

  /** True for a UDP pool's or row's listen field (`53/udp`, `0.0.0.0:53/udp`). */
  function isUdp(listen) {
    return /\/udp$/i.test(listen || '');
  }

  function clearFormErrors() {
    for (const f of FIELDS) {
      setText(document.querySelector(`.field-error[data-for="${f}"]`), '');
      $(`f-${f}`).classList.remove('bad');
    }
    $('form-error').hidden = true;
  }

  function openEntryDialog(entry) {
    state.editing = entry ? entry.id : null;
    state.dialogEtag = state.etag;
    setText($('entry-title'), entry ? `Edit “${entry.name}”` : 'Add entry');
    for (const f of FIELDS) $(`f-${f}`).value = entry ? (entry[f] || '') : '';
    // The protocol is its own choice in the form and a suffix of the listen field in the file.
    const listen = $('f-listen_port');
    $('f-proto').value = isUdp(listen.value) ? 'udp' : 'tcp';
    listen.value = listen.value.replace(/\/(udp|tcp)$/i, '');
    clearFormErrors();
    $('entry-save').disabled = false;
    $('entry-dialog').showModal();
    $('f-name').focus();
  }

  function showFormErrors(res) {
    clearFormErrors();
    const general = [];
    const errors = (res.data && res.data.errors) || [];
    for (const e of errors) {
      const input = FIELDS.includes(e.field) && !e.id ? $(`f-${e.field}`) : null;
      if (input) {
        const slot = document.querySelector(`.field-error[data-for="${e.field}"]`);
        setText(slot, slot.textContent ? `${slot.textContent}; ${e.message}` : e.message);
        input.classList.add('bad');
      } else {
        const other = state.rules && state.rules.entries.find((x) => x.id === e.id);
        general.push(`${other ? `“${other.name}” (line ${e.line})` : `line ${e.line}`}: ${e.field}: ${e.message}`);
      }
    }
    if (general.length && errors.some((e) => e.id)) general.unshift('Other rules in the file must be fixed or deleted first:');
    if (!errors.length) general.push((res.data && res.data.error) || `HTTP ${res.status}`);
    if (general.length) {
      setText($('form-error'), general.join('\n'));
      $('form-error').hidden = false;
    }
    const firstBad = FIELDS.map((f) => $(`f-${f}`)).find((i) => i.classList.contains('bad'));
    if (firstBad) firstBad.focus();
  }

  async function saveEntry(ev) {
    ev.preventDefault();
    const body = {};
    for (const f of FIELDS) body[f] = $(`f-${f}`).value.trim();
    if ($('f-proto').value === 'udp' && !isUdp(body.listen_port)) body.listen_port += '/udp';
    const save = $('entry-save');
    save.disabled = true;
    try {
      const res = state.editing
        ? await mutate('PUT', `/api/rules/${encodeURIComponent(state.editing)}`, body, state.dialogEtag)
        : await mutate('POST', '/api/rules', body, state.dialogEtag);
      if (res.ok) {
        const editing = state.editing;
        $('entry-dialog').close();
        setRules(res.data, res.etag);
        toast(editing ? `Saved “${body.name}”` : `Added “${body.name}”: port ${portOf(null, body.listen_port)} forwards to ${body.dest_ip}:${body.dest_port}`);
      } else if (res.status === 412) {
        await refreshRules(true);
        state.dialogEtag = state.etag;
        showFormErrors({ data: { error: `${res.data.error}. The table now shows the current rules; press Save again to apply your entry anyway.` } });
      } else {
        showFormErrors(res);
      }
    } catch (e) {
      showFormErrors({ data: { error: `Cannot reach the forwarder: ${e.message}` } });
    } finally {
      save.disabled = false;
    }
  }

  function openDeleteDialog() {
    const doomed = state.rules.entries.filter((e) => state.selected.has(e.id));
    if (!doomed.length) return;
    state.confirmEtag = state.etag;
    setText($('confirm-title'), `Delete ${doomed.length} entr${doomed.length === 1 ? 'y' : 'ies'}?`);
    setText($('confirm-text'), 'Established connections stay open; a port with no rule left stops listening.');
    $('confirm-list').replaceChildren(...doomed.map((e) => el('li', null, el('b', { text: e.name }), ` — port ${portOf(e.listen, e.listen_port)} → ${e.dest_ip}:${e.dest_port}`)));
    $('confirm-error').hidden = true;
    $('confirm-dialog').showModal();
    $('confirm-ok').focus();
  }

  async function confirmDelete(ev) {
    ev.preventDefault();
    const ids = state.rules.entries.filter((e) => state.selected.has(e.id)).map((e) => e.id);
    const ok = $('confirm-ok');
    ok.disabled = true;
    try {
      const res = await mutate('DELETE', `/api/rules/${ids.map(encodeURIComponent).join(',')}`, undefined, state.confirmEtag);
      if (res.ok) {
        $('confirm-dialog').close();
        state.selected.clear();
        setRules(res.data, res.etag);
        toast(`Deleted ${ids.length} entr${ids.length === 1 ? 'y' : 'ies'}`);
      } else {
        if (res.status === 412) await refreshRules(true);
        const extra = res.status === 412 ? ' The table now shows the current rules; check your selection.' : '';
        const errors = (res.data && res.data.errors) || [];
        const lines = errors.length ? errors.map((e) => `line ${e.line}: ${e.field}: ${e.message}`) : [(res.data && res.data.error) || `HTTP ${res.status}`];
        setText($('confirm-error'), lines.join('\n') + extra);
        $('confirm-error').hidden = false;
        state.confirmEtag = state.etag;
      }
    } catch (e) {
      setText($('confirm-error'), `Cannot reach the forwarder: ${e.message}`);
      $('confirm-error').hidden = false;
    } finally {
      ok.disabled = false;
    }
  }

  function askToken() {
    return new Promise((resolve) => {
      const dialog = $('token-dialog');
      const input = $('f-token');
      input.value = '';
      const done = (value) => {
        $('token-form').removeEventListener('submit', onSubmit);
        $('token-cancel').removeEventListener('click', onCancel);
        if (dialog.open) dialog.close();
        resolve(value);
      };
      const onSubmit = (ev) => {
        ev.preventDefault();
        done(input.value.trim() || null);
      };
      const onCancel = () => done(null);
      $('token-form').addEventListener('submit', onSubmit);
      $('token-cancel').addEventListener('click', onCancel);
      dialog.addEventListener('cancel', onCancel, { once: true });
      dialog.showModal();
      input.focus();
    });
  }

  function toast(text, isError) {
    const node = el('div', { class: `toast${isError ? ' error' : ''}`, role: 'status', text });
    $('toasts').append(node);
    setTimeout(() => node.remove(), isError ? 8000 : 4000);
  }

  // ---- wiring -------------------------------------------------------------------------------

  $('add-entry').addEventListener('click', () => openEntryDialog(null));
  $('entry-form').addEventListener('submit', saveEntry);
  $('entry-cancel').addEventListener('click', () => $('entry-dialog').close());
  $('delete-selected').addEventListener('click', openDeleteDialog);
  $('confirm-form').addEventListener('submit', confirmDelete);
  $('confirm-cancel').addEventListener('click', () => $('confirm-dialog').close());
  $('select-all').addEventListener('change', (ev) => {
    state.selected = ev.target.checked ? new Set(state.rows.keys()) : new Set();
    syncSelection();
  });

  tick();
})();
