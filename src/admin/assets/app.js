/* velium dashboard: the browser side of the admin listener.
 *
 * Why it is built this way:
 * - No build step and a strict CSP (default-src 'self'): one plain deferred script, no inline
 *   code; styles are set only through element.style; every node is built with
 *   createElement/textContent, because identities, state values and event texts come from
 *   untrusted shims.
 * - The event stream can deliver many messages per frame: handlers only update state and mark
 *   what is dirty, and one requestAnimationFrame pass renders. The fleet is sorted once per
 *   dirty frame and the table renders only the rows in view (fixed row height), so 5,000
 *   shims stay smooth. Charts are inline SVG redrawn at most once a second.
 */
(() => {
  'use strict';

  const ROW_H = 28;            // must match `#fleet td { height }` in app.css
  const OVERSCAN = 10;         // rows rendered above and below the visible ones
  const MAX_EVENTS = 500;
  const MAX_SAMPLES = 900;
  const MAX_KEYS = 16;
  const WINDOW_MS = 15 * 60 * 1000;
  const DEBOUNCE_MS = 300;
  const SVGNS = 'http://www.w3.org/2000/svg';
  const THEME_KEY = 'velium-theme';

  const $ = (id) => document.getElementById(id);
  const str = (v) => (v == null ? '' : String(v));
  const finite = (v) => (typeof v === 'number' && Number.isFinite(v) ? v : null);
  const own = (o, k) => o != null && typeof o === 'object' && Object.prototype.hasOwnProperty.call(o, k);
  const pad2 = (n) => String(n).padStart(2, '0');

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }
  function sv(tag, attrs, text) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = text;
    return e;
  }
  function validTime(ms) { return finite(ms) != null && Math.abs(ms) < 8.64e15; }
  function clock(ms) {
    const d = new Date(ms);
    return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  }
  function ago(ms) {
    const s = Math.max(0, Math.floor(ms / 1000));
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${s % 60}s`;
    const h = Math.floor(m / 60);
    if (h < 24) return `${h}h ${m % 60}m`;
    return `${Math.floor(h / 24)}d ${h % 24}h`;
  }

  /* ---------------------------------------------------------------- theme */

  const themeBtn = $('theme');
  const darkMq = window.matchMedia ? window.matchMedia('(prefers-color-scheme: dark)') : null;
  function savedTheme() {
    try {
      const t = localStorage.getItem(THEME_KEY);
      return t === 'dark' || t === 'light' ? t : null;
    } catch (_) { return null; }
  }
  function applyTheme() {
    const t = savedTheme() || (darkMq && darkMq.matches ? 'dark' : 'light');
    document.documentElement.dataset.theme = t;
    const other = t === 'dark' ? 'light' : 'dark';
    themeBtn.setAttribute('aria-label', `switch to ${other} theme`);
    themeBtn.title = `switch to ${other} theme`;
    const label = themeBtn.querySelector('.theme-label');
    if (label) label.textContent = other === 'dark' ? 'Dark' : 'Light';
  }
  themeBtn.addEventListener('click', () => {
    const next = document.documentElement.dataset.theme === 'dark' ? 'light' : 'dark';
    try { localStorage.setItem(THEME_KEY, next); } catch (_) { /* private mode: not kept */ }
    applyTheme();
  });
  if (darkMq && darkMq.addEventListener) darkMq.addEventListener('change', () => { if (!savedTheme()) applyTheme(); });
  applyTheme();

  /* ---------------------------------------------------------------- state */

  const S = {
    rows: new Map(),       // id -> row (as sent, plus a few cached fields starting with _)
    order: [],             // row ids sorted for display
    matched: 0,
    gotFleet: false,
    sort: { col: 'server', dir: 1 },
    known: [],             // state key names the server offers
    lastSeq: -1,
    lastAt: null,
    initialEvents: true,   // the next `events` message is the backlog of a new stream
    clearEvents: false,
    pendingEvents: [],
    samples: [],
    skew: 0,               // browser clock minus server clock, when clearly off
    problem: null,
  };
  const dirty = { header: true, sort: true, view: true, counts: true, events: false, charts: true };
  let raf = 0, rowVer = 0, lastChart = 0, chartTimer = 0;

  function schedule() { if (!raf) raf = requestAnimationFrame(frame); }
  function mark(...what) { for (const w of what) dirty[w] = true; schedule(); }
  const serverNow = () => Date.now() - S.skew;

  function frame() {
    raf = 0;
    if (dirty.header) { dirty.header = false; renderHeader(); dirty.view = true; }
    if (dirty.sort) { dirty.sort = false; sortRows(); dirty.view = true; }
    if (dirty.view) { dirty.view = false; renderView(); }
    if (dirty.counts) { dirty.counts = false; renderCounts(); }
    if (dirty.events) { dirty.events = false; renderEvents(); }
    if (dirty.charts) {
      const wait = lastChart + 1000 - performance.now();
      if (wait <= 0) {
        dirty.charts = false;
        lastChart = performance.now();
        drawCharts();
      } else if (!chartTimer) {
        chartTimer = setTimeout(() => { chartTimer = 0; schedule(); }, wait);
      }
    }
  }

  /* ---------------------------------------------------------------- columns */

  const BASE = ['server', 'zone', 'character', 'node', 'since', 'udp'];
  const LABEL = { server: 'Server', zone: 'Zone', character: 'Character', node: 'Node', since: 'Since', udp: 'UDP' };
  let cols = BASE.slice(), colsVer = 0;

  function parseKeys(text) {
    const out = [];
    for (const k of text.split(',')) {
      const t = k.trim();
      if (t && !out.includes(t)) out.push(t);
    }
    return out.slice(0, MAX_KEYS);
  }
  function setKeys(keys) {
    const next = BASE.concat(keys.map((k) => 'key:' + k));
    if (next.length === cols.length && next.every((c, i) => c === cols[i])) return;
    cols = next;
    colsVer++;
    if (!cols.includes(S.sort.col)) S.sort = { col: 'server', dir: 1 };
    mark('header', 'sort', 'view');
  }

  function cellText(r, col, now) {
    switch (col) {
      case 'server': return str(r.server);
      case 'zone': return str(r.zone);
      case 'character': return str(r.character);
      case 'node': return r.node == null || r.node === '' ? '—' : str(r.node);
      case 'since': return validTime(r.since_ms) ? ago(now - r.since_ms) : '';
      case 'udp': return r._udp;
      default: {
        const k = col.slice(4);
        return own(r.keys, k) ? str(r.keys[k]) : '';
      }
    }
  }
  function staleTitle(r, now) {
    const from = validTime(r.set_ms) ? r.set_ms : r.since_ms;
    const s = validTime(from) ? Math.max(0, Math.floor((now - from) / 1000)) : 0;
    return `no state update for ${s}s`;
  }

  /* ---------------------------------------------------------------- fleet */

  function prep(r) {
    r._v = ++rowVer;
    r._lid = str(r.identity).toLowerCase();
    const rtt = r.rtt == null ? '' : str(r.rtt);
    r._udp = r.udp ? (rtt ? `yes · ${rtt} ms` : 'yes') : 'no';
    return r;
  }

  // Most updates only change state values: re-sort only when a row came, went, was renamed
  // or changed in the sorted column, and recount only when its server, zone or node changed.
  function onFleet(m) {
    if (!m || typeof m !== 'object') return;
    let resort = false, recount = false;
    if (m.reset) { S.rows.clear(); S.gotFleet = true; resort = recount = true; }
    if (Array.isArray(m.upsert)) {
      const col = S.sort.col;
      for (const r of m.upsert) {
        if (!r || typeof r !== 'object' || r.id == null) continue;
        const old = S.rows.get(r.id);
        if (!old || old.identity !== r.identity || sortRaw(old, col) !== sortRaw(r, col)) resort = true;
        if (!old || old.identity !== r.identity || old.node !== r.node) recount = true;
        S.rows.set(r.id, prep(r));
      }
    }
    if (Array.isArray(m.remove) && m.remove.length) {
      for (const id of m.remove) S.rows.delete(id);
      resort = recount = true;
    }
    const matched = finite(m.matched) != null ? m.matched : S.rows.size;
    if (matched !== S.matched) { S.matched = matched; recount = true; }
    mark('view');
    if (resort) mark('sort');
    if (recount) mark('counts');
  }

  // Sorting: values are decorated once per sort (leading number, lower-cased text), then
  // compared; empty values go last in either direction; ties fall back to the identity.
  const NUM_RE = /^\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)/;
  function sortRaw(r, col) {
    switch (col) {
      case 'since': return finite(r.since_ms);
      case 'udp': {
        const rtt = r.rtt == null ? NaN : parseFloat(r.rtt);
        return r.udp ? (Number.isFinite(rtt) ? rtt : 1e12) : 2e12;   // bound first, fastest first
      }
      case 'server': case 'zone': case 'character': case 'node': return str(r[col]);
      default: { const k = col.slice(4); return own(r.keys, k) ? str(r.keys[k]) : ''; }
    }
  }
  function decorate(r, col) {
    const v = sortRaw(r, col);
    if (typeof v === 'number' || v == null) return { r, e: v == null, n: v == null ? NaN : v, s: '' };
    const m = NUM_RE.exec(v);
    return { r, e: v === '', n: m ? parseFloat(m[0]) : NaN, s: v.toLowerCase() };
  }
  function sortRows() {
    const { col, dir } = S.sort;
    const d = Array.from(S.rows.values(), (r) => decorate(r, col));
    d.sort((a, b) => {
      if (a.e !== b.e) return a.e ? 1 : -1;
      let c = 0;
      if (!a.e) {
        if (a.n === a.n && b.n === b.n) c = a.n - b.n;   // both start with a number
        if (c === 0 && a.s !== b.s) c = a.s < b.s ? -1 : 1;
      }
      if (c) return c * dir;
      const x = a.r._lid, y = b.r._lid;
      return x < y ? -1 : x > y ? 1 : (a.r.id < b.r.id ? -1 : a.r.id > b.r.id ? 1 : 0);
    });
    S.order = d.map((x) => x.r.id);   // ids: rows replaced by an upsert need no re-sort
  }
  function sortBy(col) {
    if (S.sort.col === col) S.sort.dir = -S.sort.dir;
    else S.sort = { col, dir: 1 };
    updateSortMarks();
    mark('sort');
  }

  const scrollEl = $('fleet-scroll');
  const table = $('fleet');
  const thead = table.tHead || table.createTHead();
  const tbody = table.tBodies[0] || table.appendChild(document.createElement('tbody'));
  const topSp = spacerRow(), botSp = spacerRow();
  const emptyRow = el('tr', 'empty');
  emptyRow.appendChild(el('td'));
  let inView = new Map();   // id -> tr currently in the DOM

  function spacerRow() {
    const tr = el('tr', 'spacer');
    tr.setAttribute('aria-hidden', 'true');
    tr.appendChild(el('td'));
    return tr;
  }

  function renderHeader() {
    const tr = el('tr');
    for (const c of cols) {
      const isKey = c.startsWith('key:');
      const th = el('th', isKey ? 'key' : null);
      th.dataset.col = c;
      th.scope = 'col';
      const b = el('button');
      b.type = 'button';
      b.title = isKey ? `sort by state key ${c.slice(4)}` : `sort by ${LABEL[c].toLowerCase()}`;
      b.appendChild(el('span', 'label', isKey ? c.slice(4) : LABEL[c]));
      const arrow = el('span', 'arrow');
      arrow.setAttribute('aria-hidden', 'true');
      b.appendChild(arrow);
      b.addEventListener('click', () => sortBy(c));
      th.appendChild(b);
      tr.appendChild(th);
    }
    thead.replaceChildren(tr);
    table.style.minWidth = `${552 + (cols.length - BASE.length) * 80}px`;   // widths as in app.css
    updateSortMarks();
  }
  function updateSortMarks() {
    for (const th of thead.querySelectorAll('th')) {
      const on = th.dataset.col === S.sort.col;
      th.setAttribute('aria-sort', on ? (S.sort.dir > 0 ? 'ascending' : 'descending') : 'none');
      th.querySelector('.arrow').textContent = on ? (S.sort.dir > 0 ? '▲' : '▼') : '';
    }
  }

  function fillRow(tr, r, now) {
    if (tr._cv !== colsVer) {
      tr.replaceChildren(...cols.map((c) => { const td = el('td'); td.dataset.col = c; return td; }));
      tr._cv = colsVer;
      tr._v = -1;
    }
    if (tr._v === r._v) return;
    tr._v = r._v;
    tr.dataset.identity = str(r.identity);
    tr.classList.toggle('stale', !!r.stale);
    const who = [str(r.identity)];
    if (r.user) who.push(`user ${r.user}`);
    who.push(r.tls ? 'tls' : 'plain tcp');
    tr.title = r.stale ? staleTitle(r, now) : who.join(' · ');
    const tds = tr.children;
    for (let i = 0; i < cols.length; i++) {
      const c = cols[i], td = tds[i];
      const t = cellText(r, c, now);
      if (td.textContent !== t) td.textContent = t;
      if (c === 'since') td.title = validTime(r.since_ms) ? new Date(r.since_ms).toLocaleString() : '';
      else if (c === 'udp') td.classList.toggle('udp-no', !r.udp);
      else if (c === 'node') td.classList.toggle('none', t === '—');
    }
  }

  function renderView() {
    const n = S.order.length;
    topSp.firstChild.colSpan = botSp.firstChild.colSpan = emptyRow.firstChild.colSpan = cols.length;
    if (!n) {
      emptyRow.firstChild.textContent = S.problem ? 'no stream: fix the pattern'
        : S.gotFleet ? 'no shims match' : 'waiting for the stream…';
      tbody.replaceChildren(emptyRow);
      inView = new Map();
      return;
    }
    const viewH = scrollEl.clientHeight || 600;
    const first = Math.floor(scrollEl.scrollTop / ROW_H);
    const start = Math.max(0, first - OVERSCAN);
    const end = Math.min(n, first + Math.ceil(viewH / ROW_H) + OVERSCAN);
    topSp.firstChild.style.height = `${start * ROW_H}px`;
    botSp.firstChild.style.height = `${(n - end) * ROW_H}px`;
    const now = serverNow();
    const next = new Map();
    const list = [topSp];
    for (let i = start; i < end; i++) {
      const r = S.rows.get(S.order[i]);
      if (!r) continue;
      let tr = inView.get(r.id);
      if (!tr) tr = el('tr');
      fillRow(tr, r, now);
      next.set(r.id, tr);
      list.push(tr);
    }
    list.push(botSp);
    // Only touch the DOM order when it changed (scrolling within overscan often doesn't).
    const kids = tbody.children;
    let same = kids.length === list.length;
    for (let i = 0; same && i < list.length; i++) same = kids[i] === list[i];
    if (!same) tbody.replaceChildren(...list);
    inView = next;
  }

  // Once a second: relative times and stale titles of the rows in view, nothing else.
  setInterval(() => {
    const now = serverNow();
    const si = cols.indexOf('since');
    for (const [id, tr] of inView) {
      const r = S.rows.get(id);
      if (!r || tr._cv !== colsVer) continue;
      const td = tr.children[si];
      const t = cellText(r, 'since', now);
      if (td && td.textContent !== t) td.textContent = t;
      if (r.stale) tr.title = staleTitle(r, now);
    }
  }, 1000);

  scrollEl.addEventListener('scroll', () => mark('view'), { passive: true });
  window.addEventListener('resize', () => mark('view'));

  /* ---------------------------------------------------------------- counts */

  function bump(map, k) { map.set(k, (map.get(k) || 0) + 1); }
  function fillCounts(ul, map) {
    const list = Array.from(map).sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    const max = list.length ? list[0][1] : 1;
    const items = list.slice(0, 100).map(([name, n]) => {
      const li = el('li');
      li.dataset.name = name;
      const bar = el('span', 'bar');
      bar.setAttribute('aria-hidden', 'true');
      bar.style.width = `${((n / max) * 100).toFixed(1)}%`;
      li.append(bar, el('span', 'name', name || '(none)'), ' ', el('span', 'n', String(n)));
      li.title = `${name || '(none)'}: ${n}`;
      return li;
    });
    if (list.length > 100) items.push(el('li', 'more', `+${list.length - 100} more`));
    ul.replaceChildren(...items);
  }
  function renderCounts() {
    const srv = new Map(), zone = new Map(), node = new Map();
    for (const r of S.rows.values()) {
      bump(srv, str(r.server));
      bump(zone, str(r.zone));
      if (r.node != null && r.node !== '') bump(node, str(r.node));
    }
    fillCounts($('counts-server'), srv);
    fillCounts($('counts-zone'), zone);
    const nodeUl = $('counts-node');
    nodeUl.parentElement.hidden = node.size === 0;
    fillCounts(nodeUl, node);
    $('matched').textContent = `${S.matched} shims`;
  }

  /* ---------------------------------------------------------------- events */

  function onEvents(list) {
    if (!Array.isArray(list)) return;
    if (S.initialEvents) {
      S.initialEvents = false;
      // The backlog holds the hub's last events: an empty one, one that ends before what we
      // hold, or one with another event under our last seq means the hub restarted.
      const last = list.length ? finite(list[list.length - 1].seq) : null;
      const same = list.find((e) => e && e.seq === S.lastSeq);
      if (S.lastSeq >= 0 && (!list.length || (last != null && last < S.lastSeq) || (same && same.at_ms !== S.lastAt))) {
        S.lastSeq = -1;
        S.pendingEvents = [];
        S.clearEvents = true;
      }
    }
    for (const e of list) {
      if (!e || typeof e !== 'object') continue;
      const seq = finite(e.seq);
      if (seq != null) {
        if (seq <= S.lastSeq) continue;
        S.lastSeq = seq;
        S.lastAt = e.at_ms;
      }
      S.pendingEvents.push(e);
    }
    if (S.pendingEvents.length > MAX_EVENTS) S.pendingEvents.splice(0, S.pendingEvents.length - MAX_EVENTS);
    mark('events');
  }
  function eventLi(e) {
    const kind = str(e.kind) || 'event';
    const li = el('li');
    li.dataset.kind = kind;
    const t = el('time', 'at', validTime(e.at_ms) ? clock(e.at_ms) : '');
    if (validTime(e.at_ms)) {
      const d = new Date(e.at_ms);
      t.dateTime = d.toISOString();
      t.title = d.toLocaleString();
    }
    li.append(t, ' ', el('span', 'badge', kind));
    if (e.identity != null && e.identity !== '') {
      const who = el('span', 'who', str(e.identity));
      who.title = who.textContent;
      li.append(' ', who);
    }
    if (e.text != null && e.text !== '') {
      const what = el('span', 'what', str(e.text));
      what.title = what.textContent;
      li.append(' ', what);
    }
    return li;
  }
  function renderEvents() {
    const ol = $('events');
    if (S.clearEvents) { S.clearEvents = false; ol.replaceChildren(); }
    const p = S.pendingEvents;
    S.pendingEvents = [];
    if (!p.length) return;
    const frag = document.createDocumentFragment();
    for (let i = p.length - 1; i >= 0; i--) frag.appendChild(eventLi(p[i]));
    ol.insertBefore(frag, ol.firstChild);
    while (ol.children.length > MAX_EVENTS) ol.lastElementChild.remove();
  }

  /* ---------------------------------------------------------------- charts */

  function compact(v) {
    const a = Math.abs(v);
    if (a >= 1e6) return `${+(v / 1e6).toFixed(a >= 1e7 ? 0 : 1)}M`;
    if (a >= 1e4) return `${+(v / 1e3).toFixed(0)}k`;
    if (a >= 1e3) return `${+(v / 1e3).toFixed(1)}k`;
    return null;
  }
  const fmtCount = (v) => compact(v) || String(Math.round(v));
  const fmtRate = (v) => compact(v) || (v < 10 && v % 1 ? v.toFixed(1) : String(Math.round(v)));
  // Legend values are exact; axis labels (fmt) are compact.
  const exactCount = (v) => Math.round(v).toLocaleString('en-US');
  const exactRate = (v) => (v < 10 && v % 1 ? v.toFixed(1) : Math.round(v).toLocaleString('en-US'));
  function fmtUs(v) {
    if (v < 1000) return `${Math.round(v)} µs`;
    if (v < 1e6) return `${+(v / 1000).toFixed(v < 1e4 ? 1 : 0)} ms`;
    return `${+(v / 1e6).toFixed(1)} s`;
  }

  const CHARTS = [
    { id: 'chart-connections', fmt: fmtCount, exact: exactCount, int: true, series: [
      { key: 'connections', label: 'connections', cls: 'c1' },
      { key: 'shims', label: 'shims', cls: 'c3' }] },
    { id: 'chart-handshakes', fmt: fmtRate, exact: exactRate, series: [
      { key: 'handshakes', label: 'handshakes/s', cls: 'c1' }] },
    { id: 'chart-frames', fmt: fmtRate, exact: exactRate, series: [
      { key: 'frames_in', label: 'in/s', cls: 'c1' },
      { key: 'frames_out', label: 'out/s', cls: 'c2' }] },
    { id: 'chart-latency', fmt: fmtUs, exact: fmtUs, series: [
      { key: 'handshake_p50_us', label: 'handshake p50', cls: 'c1' },
      { key: 'handshake_p99_us', label: 'p99', cls: 'c1', dash: true },
      { key: 'bind_p50_us', label: 'bind p50', cls: 'c2' },
      { key: 'bind_p99_us', label: 'p99', cls: 'c2', dash: true }] },
  ];

  function niceScale(max, int) {
    if (!(max > 0)) return { step: int ? 1 : 0.5, top: int ? 2 : 1 };
    const raw = max / 3;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const steps = int ? [1, 2, 5, 10] : [1, 2, 2.5, 5, 10];
    let step = mag * steps.find((s) => s * mag >= raw);
    if (int) step = Math.max(1, Math.round(step));
    return { step, top: Math.ceil(max / step - 1e-9) * step };
  }

  function onStats(m) {
    if (!m || typeof m !== 'object') return;
    if (Array.isArray(m.history)) S.samples = m.history.filter((s) => s && validTime(s.at_ms)).slice(-MAX_SAMPLES);
    if (m.sample && validTime(m.sample.at_ms)) {
      S.samples.push(m.sample);
      if (S.samples.length > MAX_SAMPLES) S.samples.splice(0, S.samples.length - MAX_SAMPLES);
      // Relative times use the server's clock when the browser's is clearly off.
      const d = Date.now() - m.sample.at_ms;
      if (Math.abs(d - S.skew) > 3000) S.skew = Math.abs(d) > 3000 ? d : 0;
    }
    mark('charts');
  }

  // Legend widths come from a canvas: measuring SVG text would force a layout of the page.
  const measure = document.createElement('canvas').getContext('2d');
  const FONT = getComputedStyle(document.body).fontFamily || 'system-ui, sans-serif';
  function textWidth(t, weight) {
    if (!measure) return t.length * 6.5;
    measure.font = `${weight} 11px ${FONT}`;
    return measure.measureText(t).width;
  }

  function drawCharts() { for (const c of CHARTS) drawChart(c); }

  function drawChart(def) {
    const root = $(def.id);
    if (!root) return;
    let box = chartSize.get(root);
    if (!box) { box = root.getBoundingClientRect(); chartSize.set(root, box); }
    const W = Math.max(160, Math.round(box.width) || 300), H = Math.max(100, Math.round(box.height) || 160);
    root.setAttribute('viewBox', `0 0 ${W} ${H}`);
    const sm = S.samples;
    const last = sm.length ? sm[sm.length - 1] : null;

    // Legend (with the latest values) first: it may wrap, and the plot starts below it.
    const legend = sv('g', { class: 'legend' });
    root.replaceChildren(legend);
    let lx = 0, ly = 11;
    for (const s of def.series) {
      const v = last ? finite(last[s.key]) : null;
      const g = sv('g', {});
      const text = sv('text', { x: 0, y: 0 });
      text.append(sv('tspan', {}, `${s.label} `), sv('tspan', { class: 'val' }, v == null ? '–' : def.exact(v)));
      const sw = sv('line', { class: `sw ${s.cls}${s.dash ? ' dash' : ''}`, x1: 1, x2: 13, y1: -4, y2: -4 });
      g.append(sw, text);
      legend.appendChild(g);
      text.setAttribute('x', 18);
      const w = 18 + textWidth(`${s.label} `, 400) + textWidth(text.lastChild.textContent, 600) + 14;
      if (lx > 0 && lx + w > W) { lx = 0; ly += 15; }
      g.setAttribute('transform', `translate(${lx},${ly})`);
      lx += w;
    }

    const L = 44, R = 6, T = ly + 12, B = 16;
    const pw = W - L - R, ph = H - T - B;
    if (ph < 20) return;
    const t1 = last ? last.at_ms : serverNow(), t0 = t1 - WINDOW_MS;
    const xOf = (t) => L + ((t - t0) / WINDOW_MS) * pw;

    let max = 0;
    for (const s of sm) {
      if (s.at_ms < t0) continue;
      for (const ser of def.series) {
        const v = finite(s[ser.key]);
        if (v != null && v > max) max = v;
      }
    }
    const { step, top } = niceScale(max, def.int);
    const yOf = (v) => T + ph - (v / top) * ph;

    const grid = sv('g', { class: 'grid' }), axis = sv('g', { class: 'axis' });
    for (let v = 0, i = 0; v <= top + step / 1e6 && i < 8; v += step, i++) {
      const y = Math.round(yOf(v)) + 0.5;
      grid.appendChild(sv('line', { x1: L, x2: W - R, y1: y, y2: y, class: i === 0 ? 'zero' : '' }));
      axis.appendChild(sv('text', { x: L - 6, y: y + 3.5, 'text-anchor': 'end' }, def.fmt(v)));
    }
    for (const min of [15, 10, 5, 0]) {
      const x = xOf(t1 - min * 60000);
      axis.appendChild(sv('text', { x, y: H - 3, 'text-anchor': min === 15 ? 'start' : min === 0 ? 'end' : 'middle' },
        min ? `-${min}m` : 'now'));
    }
    root.append(grid, axis);

    if (!sm.length) {
      root.appendChild(sv('text', { class: 'empty', x: L + pw / 2, y: T + ph / 2, 'text-anchor': 'middle' }, 'waiting for samples…'));
      return;
    }
    // One path per series; a null value or a hole of more than 3 s lifts the pen.
    for (const ser of def.series) {
      let d = '', prevT = -Infinity, run = 0;
      for (const s of sm) {
        if (s.at_ms < t0) continue;
        const v = finite(s[ser.key]);
        if (v == null || s.at_ms - prevT > 3000) {
          if (run === 1) d += 'h0.01';
          run = 0;
        }
        if (v != null) {
          d += `${run ? 'L' : 'M'}${xOf(s.at_ms).toFixed(1)} ${yOf(v).toFixed(1)}`;
          run++;
        }
        prevT = s.at_ms;
      }
      if (run === 1) d += 'h0.01';
      if (d) root.appendChild(sv('path', { d, class: `line ${ser.cls}${ser.dash ? ' dash' : ''}` }));
    }
  }

  // Sizes come from the observer, so drawing never has to ask for (and force) a layout.
  const chartSize = new Map();
  if (window.ResizeObserver) {
    const ro = new ResizeObserver((entries) => {
      for (const e of entries) chartSize.set(e.target, e.contentRect);
      mark('charts');
    });
    for (const c of CHARTS) if ($(c.id)) ro.observe($(c.id));
  }

  /* ---------------------------------------------------------------- stream */

  const filterIn = $('filter'), keysIn = $('keys'), staleIn = $('stale'), keyAdd = $('key-add');
  const filterErr = $('filter-error'), live = $('live');
  let es = null, esUrl = '', debTimer = 0, retryTimer = 0, retryDelay = 1000;

  function setLive(on, why) {
    live.dataset.state = on ? 'live' : 'down';
    live.textContent = on ? 'live' : 'reconnecting…';
    live.title = on ? 'event stream open' : (why || 'event stream down, reconnecting');
  }
  function showProblem(msg) {
    S.problem = msg;
    filterErr.textContent = msg;
    filterIn.setAttribute('aria-invalid', 'true');
  }
  function clearProblem() {
    S.problem = null;
    filterErr.textContent = '';
    filterIn.removeAttribute('aria-invalid');
  }
  function streamUrl() {
    const p = new URLSearchParams();
    const pattern = filterIn.value.trim();
    if (pattern) p.set('pattern', pattern);
    const keys = parseKeys(keysIn.value);
    if (keys.length) p.set('keys', keys.join(','));
    const stale = Number(staleIn.value);
    if (staleIn.value.trim() !== '' && Number.isInteger(stale) && stale >= 0) p.set('stale', String(stale));
    const q = p.toString();
    return q ? `/api/stream?${q}` : '/api/stream';
  }
  function closeStream() {
    if (es) { es.close(); es = null; }
    clearTimeout(retryTimer);
  }

  function openStream(force) {
    clearTimeout(debTimer);
    const url = streamUrl();
    if (!force && es && url === esUrl) return;
    closeStream();
    setKeys(parseKeys(keysIn.value));
    esUrl = url;
    const src = new EventSource(url);
    es = src;
    const on = (name, fn) => src.addEventListener(name, (ev) => {
      if (es !== src) return;
      let data;
      try { data = JSON.parse(ev.data); } catch (_) { return; }
      fn(data);
    });
    src.onopen = () => { if (es === src) { setLive(true); retryDelay = 1000; } };
    src.onerror = () => {
      if (es !== src) return;
      setLive(false);
      // EventSource retries by itself unless the answer was not a stream (401, 5xx...).
      if (src.readyState === EventSource.CLOSED) {
        es = null;
        retryTimer = setTimeout(() => { checkAuth(); openStream(true); }, retryDelay);
        retryDelay = Math.min(retryDelay * 2, 30000);
      }
    };
    on('hello', (h) => {
      S.initialEvents = true;
      $('node').textContent = h.node ? str(h.node) : 'single node';
      $('version').textContent = h.version ? `v${str(h.version)}` : '';
      if (Array.isArray(h.keys)) setKeys(h.keys.map(str).slice(0, MAX_KEYS));
      setLive(true);
    });
    on('problem', (p) => {
      closeStream();
      setLive(false, 'stream stopped: fix the pattern');
      showProblem(str(p && p.message) || 'the server refused the filter');
      S.rows.clear();
      S.matched = 0;
      mark('sort', 'counts');
    });
    on('fleet', onFleet);
    on('events', onEvents);
    on('stats', onStats);
    on('keys', (k) => {
      if (!Array.isArray(k)) return;
      const known = k.map(str).slice(0, 64);
      if (known.join('\n') === S.known.join('\n')) return;   // rebuilding would close an open picker
      S.known = known;
      renderKeyOptions();
    });
  }
  function reopenSoon() {
    clearTimeout(debTimer);
    debTimer = setTimeout(() => openStream(false), DEBOUNCE_MS);
  }
  // A stream closed for good may mean the session ended: show the login page then.
  function checkAuth() {
    fetch('/', { cache: 'no-store' }).then((r) => { if (r.status === 401) location.reload(); }, () => {});
  }

  function renderKeyOptions() {
    const picked = new Set(parseKeys(keysIn.value));
    const full = picked.size >= MAX_KEYS;
    const first = el('option', null, full ? `max ${MAX_KEYS} keys` : 'add key…');
    first.value = '';
    const opts = [first];
    if (!full) for (const k of S.known) if (!picked.has(k)) { const o = el('option', null, k); o.value = k; opts.push(o); }
    keyAdd.replaceChildren(...opts);
    keyAdd.disabled = opts.length === 1;
  }

  filterIn.addEventListener('input', () => { clearProblem(); reopenSoon(); });
  filterIn.addEventListener('keydown', (e) => {
    if (e.key === 'Enter') { e.preventDefault(); clearProblem(); openStream(true); }
    else if (e.key === 'Escape') {
      e.preventDefault();
      if (filterIn.value) { filterIn.value = ''; clearProblem(); openStream(true); } else filterIn.blur();
    }
  });
  for (const input of [keysIn, staleIn]) {
    input.addEventListener('input', () => { reopenSoon(); renderKeyOptions(); });
    input.addEventListener('keydown', (e) => { if (e.key === 'Enter') { e.preventDefault(); openStream(true); } });
  }
  keyAdd.addEventListener('change', () => {
    const k = keyAdd.value;
    if (!k) return;
    keysIn.value = parseKeys(keysIn.value).concat(k).slice(0, MAX_KEYS).join(',');
    renderKeyOptions();
    openStream(true);
  });
  document.addEventListener('keydown', (e) => {
    if (e.key !== '/' || e.ctrlKey || e.metaKey || e.altKey) return;
    const t = e.target;
    if (t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName))) return;
    e.preventDefault();
    filterIn.focus();
    filterIn.select();
  });

  /* ---------------------------------------------------------------- send */

  const sendForm = $('send'), sendBtn = $('send-submit'), sendStatus = $('send-status'), answers = $('answers');
  let sending = false;

  function status(text, cls) {
    sendStatus.textContent = text;
    sendStatus.className = cls || '';
  }
  function answerLine(o) {
    const li = el('li');
    li.dataset.from = str(o.from);
    const ms = finite(o.ms);
    li.append(el('span', 'from', str(o.from)), ': ', el('span', 'text', str(o.text)));
    if (ms != null) li.append(' ', el('span', 'ms', `(${ms} ms)`));
    answers.appendChild(li);
  }
  function errorLine(msg) {
    answers.appendChild(el('li', 'error', msg));
    status(msg, 'error');
  }
  const optional = (id) => { const v = $(id).value.trim(); return v ? v : null; };

  sendForm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    if (sending) return;
    const kind = $('send-kind').value === 'echo' ? 'echo' : 'command';
    const timeout = Number($('send-timeout').value);
    const body = {
      kind,
      target: $('send-target').value.trim(),
      text: $('send-text').value,
      timeout_ms: Number.isFinite(timeout) && timeout > 0 ? Math.round(timeout) : 5000,
      identity: optional('send-identity'),
      user: optional('send-user'),
      secret: $('send-secret').value || null,
    };
    sending = true;
    sendBtn.disabled = true;
    answers.replaceChildren();
    status('sending…');
    let reached = 0, answered = 0, failed = false;
    const summary = () => (kind === 'command' ? `reached ${reached} · answered ${answered} of ${reached}` : `reached ${reached}`);
    const handle = (o) => {
      if (!o || typeof o !== 'object') return;
      if (o.type === 'sent') {
        reached = finite(o.reached) || 0;
        status(kind === 'command' ? `${summary()} · waiting…` : summary(), 'ok');
      } else if (o.type === 'answer') {
        answered++;
        answerLine(o);
        status(`${summary()} · waiting…`, 'ok');
      } else if (o.type === 'error') {
        failed = true;
        errorLine(str(o.message) || 'error');
      } else if (o.type === 'done') {
        reached = finite(o.reached) != null ? o.reached : reached;
        answered = finite(o.answered) != null ? o.answered : answered;
        if (Array.isArray(o.missing)) {
          for (const m of o.missing) { const li = el('li', 'missing', `${str(m)}: no answer`); li.dataset.missing = str(m); answers.appendChild(li); }
        }
        if (!failed) status(summary(), 'ok');
      }
    };
    try {
      const res = await fetch('/api/send', {
        method: 'POST',
        headers: { 'X-Velium-Dashboard': '1', 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
      });
      if (!res.ok) {
        const type = res.headers.get('Content-Type') || '';
        const text = type.includes('html') ? '' : (await res.text()).trim().slice(0, 300);
        throw new Error(res.status === 401 ? 'not authorized: reload the page and log in'
          : text ? `HTTP ${res.status}: ${text}` : `HTTP ${res.status}`);
      }
      if (!res.body) throw new Error('no response body');
      const reader = res.body.getReader();
      const dec = new TextDecoder();
      let buf = '';
      const line = (l) => {
        if (!l.trim()) return;
        let o;
        try { o = JSON.parse(l); } catch (_) { failed = true; errorLine(`bad line from server: ${l.slice(0, 120)}`); return; }
        handle(o);
      };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf('\n')) >= 0) { line(buf.slice(0, i)); buf = buf.slice(i + 1); }
      }
      line(buf + dec.decode());
    } catch (e) {
      failed = true;
      errorLine(e && e.message ? e.message : String(e));
    } finally {
      sending = false;
      sendBtn.disabled = false;
    }
  });

  /* ---------------------------------------------------------------- start */

  setLive(false);
  renderKeyOptions();
  openStream(true);
  schedule();
})();
