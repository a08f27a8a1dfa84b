/**
 * Everything a page loads, served by vhdvault itself (no CDN: the dashboard
 * works offline): the style sheet, two small scripts, and uPlot, the charting
 * library, read from its package once at start. Served by name from this
 * fixed table: a URL never becomes a file path.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';

export interface Asset {
  type: string;
  body: Buffer;
}

const STYLE = `
:root { --ok: #1a7f37; --late: #b35900; --failed: #c62828; --never: #6e40c9; --running: #0969da; --muted: #6b7280; }
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1f2328; }
header { display: flex; gap: 2em; align-items: center; padding: .6em 1.5em; background: #24292f; }
header a { color: #fff; text-decoration: none; margin-right: 1.2em; }
header .brand { font-weight: 700; }
main { padding: 1em 1.5em; max-width: 1200px; }
table { border-collapse: collapse; width: 100%; margin-bottom: 1.5em; }
th, td { text-align: left; padding: .35em .6em; border-bottom: 1px solid #d0d7de; vertical-align: top; }
code { font-size: 12px; }
.muted { color: var(--muted); }
.error { color: var(--failed); }
.pill { display: inline-block; padding: 0 .55em; border-radius: 1em; color: #fff; font-size: 12px; background: var(--muted); }
.pill.ok { background: var(--ok); } .pill.late { background: var(--late); } .pill.failed { background: var(--failed); }
.pill.never { background: var(--never); } .pill.running { background: var(--running); } .pill.unreadable { background: var(--failed); }
.stages { display: flex; width: 320px; height: 18px; border-radius: 3px; overflow: hidden; font-size: 11px; color: #fff; }
.stage { display: inline-block; overflow: hidden; white-space: nowrap; padding: 0 3px; background: #8c959f; }
.stage.read { background: #0969da; } .stage.digest { background: #8250df; } .stage.compress { background: #bf8700; } .stage.write { background: #1a7f37; }
.stage.bounding { outline: 2px solid #000; outline-offset: -2px; font-weight: 700; }
.bounding .stage { margin-right: 2px; border-radius: 3px; color: #fff; font-size: 11px; }
ol.chain { list-style: none; padding: 0; }
ol.chain li { position: relative; padding: .3em .5em; margin: .2em 0; border-left: 4px solid var(--running); }
ol.chain li.full { border-left-color: var(--ok); }
ol.chain .bar { position: absolute; left: 0; top: 0; bottom: 0; background: #0969da14; z-index: -1; }
pre { background: #f6f8fa; padding: .6em; overflow-x: auto; }
.login { max-width: 28em; margin: 4em auto; }
`;

/** Refreshes the overview while a run goes: states, ages, progress, from /api/dashboard every 2 s. */
const LIVE = `
(() => {
  const cell = (row, sel) => row && row.querySelector(sel);
  const words = { ok: 'protected', late: 'late', failed: 'failed', never: 'never backed up', running: 'running', unscheduled: 'no job', unreadable: 'repository unreadable' };
  const age = (s) => { const u = [['d', 86400], ['h', 3600], ['min', 60], ['s', 1]]; const out = []; for (const [n, z] of u) { if (s >= z || (!out.length && z === 1)) { out.push(Math.floor(s / z) + ' ' + n); s %= z; } if (out.length === 2) break; } return out.join(' ') + ' ago'; };
  async function refresh() {
    let doc;
    try { const r = await fetch('/api/dashboard', { credentials: 'same-origin' }); if (!r.ok) return; doc = await r.json(); } catch { return; }
    for (const d of doc.disks) {
      const row = [...document.querySelectorAll('#disks tr[data-disk]')].find((tr) => tr.dataset.disk === d.disk && tr.dataset.repository === d.repository);
      const state = cell(row, 'td.state');
      if (!state) continue;
      row.className = d.state;
      state.textContent = '';
      const pill = document.createElement('span');
      pill.className = 'pill ' + d.state; pill.textContent = words[d.state] || d.state;
      state.append(pill);
      if (d.progress !== null) { const p = document.createElement('progress'); p.max = 1; p.value = d.progress; state.append(' ', p, ' ' + Math.round(d.progress * 100) + '%'); }
      const a = cell(row, 'td.age'); if (a && d.ageSeconds !== null) a.textContent = age(d.ageSeconds);
    }
    for (const j of doc.jobs) {
      const row = [...document.querySelectorAll('#jobs tr[data-job]')].find((tr) => tr.dataset.job === j.name);
      const button = cell(row, 'button'); if (button) button.disabled = j.running !== null;
      const s = cell(row, 'td.job-state');
      if (s && j.running) { s.textContent = ''; const pill = document.createElement('span'); pill.className = 'pill running'; pill.textContent = 'running since ' + j.running.startedAt; s.append(pill); }
      else if (s && row.dataset.wasRunning) location.reload();
      if (row) row.dataset.wasRunning = j.running ? '1' : '';
    }
  }
  for (const form of document.querySelectorAll('form.run-now')) {
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const r = await fetch(form.action, { method: 'POST', credentials: 'same-origin', headers: { Accept: 'application/json' } });
      if (!r.ok) alert((await r.json().catch(() => ({}))).error || r.statusText);
      refresh();
    });
  }
  setInterval(refresh, 2000);
})();
`;

/** Draws each disk's trend (seconds and MiB stored per run) with uPlot from the JSON its section embeds. */
const TRENDS = `
(() => {
  for (const section of document.querySelectorAll('section.trend')) {
    const points = JSON.parse(section.querySelector('script[type="application/json"]').textContent);
    const x = points.map((p) => Date.parse(p.at) / 1000);
    const data = [x, points.map((p) => p.seconds), points.map((p) => p.bytesWritten / 1048576)];
    const opts = {
      width: Math.min(900, section.clientWidth || 900), height: 220,
      scales: { x: { time: true }, s: {}, mib: {} },
      series: [{}, { label: 'seconds', scale: 's', stroke: '#0969da', points: { show: true } }, { label: 'MiB stored', scale: 'mib', stroke: '#1a7f37', points: { show: true } }],
      axes: [{}, { scale: 's', label: 'seconds' }, { scale: 'mib', side: 1, label: 'MiB', grid: { show: false } }],
    };
    // Kept on its section: a test (or a curious person in the console) can read what was drawn.
    section.plot = new uPlot(opts, data, section.querySelector('.plot'));
  }
})();
`;

const require = createRequire(import.meta.url);
const fromPackage = (name: string) => readFileSync(require.resolve(name));

/** The table of assets; uPlot's files are read here, once. */
export function loadAssets(): Map<string, Asset> {
  const css = 'text/css; charset=utf-8';
  const js = 'text/javascript; charset=utf-8';
  return new Map<string, Asset>([
    ['style.css', { type: css, body: Buffer.concat([Buffer.from(STYLE), fromPackage('uplot/dist/uPlot.min.css')]) }],
    ['live.js', { type: js, body: Buffer.from(LIVE) }],
    ['trends.js', { type: js, body: Buffer.from(TRENDS) }],
    ['uPlot.iife.min.js', { type: js, body: fromPackage('uplot/dist/uPlot.iife.min.js') }],
  ]);
}
