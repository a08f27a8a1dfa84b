/**
 * The dashboard's pages, rendered on the server from the same documents
 * `/api` returns: a page reads whole without JavaScript; a small script
 * (assets.ts) refreshes what a run in progress changes, and draws the trends.
 */
import type { DiskRun, JobRunReport } from '../jobs/runReport.js';
import type { BackupMetadata } from '../store/metadata.js';
import type { VmRecord } from '../store/vmRecord.js';
import { formatBytes } from '../util/sizes.js';
import type { DashboardDocument, DiskState, DiskStatus } from './dashboard.js';
import { duration, html, Html, urlPart } from './html.js';

const STATE_WORDS: Record<DiskState, string> = {
  ok: 'protected',
  late: 'late',
  failed: 'failed',
  never: 'never backed up',
  running: 'running',
  unscheduled: 'no job',
  unreadable: 'repository unreadable',
};

/** The frame of every page: its title, the navigation, and the scripts it needs. */
export function page(title: string, body: Html, scripts: string[] = []): string {
  return html`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>${title} · vhdvault</title><link rel="icon" href="data:,"><link rel="stylesheet" href="/assets/style.css">${scripts.map((s) => html`<script defer src="/assets/${s}"></script>`)}</head>
<body><header><a class="brand" href="/">vhdvault</a><nav><a href="/">Overview</a><a href="/trends">Trends</a><a href="/metrics">Metrics</a></nav></header>
<main>${body}</main></body></html>
`.text;
}

export const diskLink = (d: { repository: string; disk: string }, repoIndex: number) => `/disks/${repoIndex}/${urlPart(d.disk)}`;
export const vmLink = (vm: string, repoIndex: number) => `/vms/${repoIndex}/${urlPart(vm)}`;
export const runLink = (job: string, runId: string) => `/jobs/${urlPart(job)}/runs/${urlPart(runId)}`;

/** `canRun`: a daemon, which can start a job now (`ui` cannot: no button). */
export function overviewPage(doc: DashboardDocument, canRun: boolean): string {
  const repoIndex = (root: string) => doc.repositories.findIndex((r) => r.repository === root);
  const counts = new Map<DiskState, number>();
  for (const d of doc.disks) counts.set(d.state, (counts.get(d.state) ?? 0) + 1);
  const summary = [...counts].map(([s, n]) => html`<span class="pill ${s}">${n} ${STATE_WORDS[s]}</span>`);
  const body = html`
<h1>Overview</h1>
<p class="summary" data-generated="${doc.generatedAt}">${doc.disks.length} disk${doc.disks.length === 1 ? '' : 's'}: ${summary} <span class="muted">as of ${doc.generatedAt}</span></p>
<h2>Disks and VMs</h2>
${doc.disks.length === 0 ? html`<p class="muted">No disk yet.</p>` : diskTable(doc.disks, repoIndex)}
<h2>Jobs</h2>
${doc.jobs.length === 0 ? html`<p class="muted">No job given: only repositories.</p>` : jobTable(doc, canRun)}
<h2>Repositories</h2>
<table><thead><tr><th>repository</th><th>disks</th><th>backups</th><th>stored</th><th></th></tr></thead><tbody>
${doc.repositories.map((r) => html`<tr><td><code>${r.repository}</code></td><td>${r.disks}</td><td>${r.backups}</td><td>${formatBytes(r.bytesStored)}</td><td>${r.problem ? html`<span class="pill failed">${r.problem}</span>` : ''}</td></tr>`)}
</tbody></table>`;
  return page('Overview', body, ['live.js']);
}

function diskTable(disks: DiskStatus[], repoIndex: (root: string) => number): Html {
  return html`<table id="disks"><thead><tr><th>disk</th><th>job</th><th>state</th><th>last backup</th><th>age</th><th title="what the newest backup occupies in the repository">stored</th><th>last run</th></tr></thead><tbody>
${disks.map(
  (d) => html`<tr data-disk="${d.disk}" data-repository="${d.repository}" class="${d.state}">
<td><a href="${diskLink(d, repoIndex(d.repository))}">${d.disk}</a>${d.vm && d.latest ? html` <span class="muted">(VM <a href="${vmLink(d.vm, repoIndex(d.repository))}">${d.vm}</a>)</span>` : d.vm ? html` <span class="muted">(VM)</span>` : ''}</td>
<td>${d.job ?? html`<span class="muted">—</span>`}</td>
<td class="state"><span class="pill ${d.state}">${STATE_WORDS[d.state]}</span>${d.progress !== null ? html` <progress max="1" value="${d.progress.toFixed(3)}"></progress> ${Math.round(d.progress * 100)}%` : ''}</td>
<td>${d.latest ? html`${d.latest.kind} <code>${d.latest.id}</code>` : '—'}</td>
<td class="age">${d.ageSeconds === null ? '—' : `${duration(d.ageSeconds)} ago`}</td>
<td>${d.latest ? formatBytes(d.latest.bytesStored) : '—'}</td>
<td>${d.problem ? html`<span class="error">${d.problem}</span>` : d.lastRun ? html`<a href="${runLink(d.lastRun.job, d.lastRun.runId)}">${d.lastRun.ok ? 'ok' : 'failed'}</a>${d.lastRun.error ? html`: <span class="error">${d.lastRun.error}</span>` : ''}` : '—'}</td>
</tr>`,
)}
</tbody></table>`;
}

function jobTable(doc: DashboardDocument, canRun: boolean): Html {
  return html`<table id="jobs"><thead><tr><th>job</th><th>schedule</th><th>next run</th><th>last run</th><th>runs</th><th></th></tr></thead><tbody>
${doc.jobs.map(
  (j) => html`<tr data-job="${j.name}">
<td>${j.name}</td><td><code>${j.schedule}</code>${j.timezone ? ` (${j.timezone})` : ''}</td>
<td>${j.nextRun ?? 'never'}</td>
<td class="job-state">${j.running ? html`<span class="pill running">running since ${j.running.startedAt}</span>` : j.lastRun ? html`<a href="${runLink(j.name, j.lastRun.runId)}">${j.lastRun.ok ? 'ok' : j.lastRun.stopped ? 'stopped' : 'failed'}</a>, ${duration(j.lastRun.durationMs / 1000)}, ${j.lastRun.startedAt}` : '—'}</td>
<td>${j.runs}${j.failedRuns ? html` <span class="error">(${j.failedRuns} failed)</span>` : ''}</td>
<td>${canRun ? html`<form method="post" action="/api/jobs/${urlPart(j.name)}/run" class="run-now"><button type="submit"${j.running ? ' disabled' : ''}>Run now</button></form>` : ''}</td>
</tr>`,
)}
</tbody></table>`;
}

/** A vhdvault command line to copy into a shell: a word with anything but safe characters single-quoted. */
function command(...words: string[]): string {
  const quote = (w: string) => (/^[A-Za-z0-9_./:=@%+,-]+$/.test(w) ? w : `'${w.replaceAll("'", "'\\''")}'`);
  return ['vhdvault', ...words.map(quote)].join(' ');
}

const STAGE_ORDER = ['read', 'digest', 'compress', 'write'] as const;

/** One run of a job: per disk a bar of its stages' busy time, the bounding one marked. */
export function runPage(r: JobRunReport): string {
  const body = html`
<h1>Run <code>${r.runId}</code> of ${r.job}</h1>
<p><span class="pill ${r.ok ? 'ok' : 'failed'}">${r.ok ? 'ok' : r.stopped ? 'stopped' : 'failed'}</span> ${r.trigger}, began ${r.startedAt}, took ${duration(r.durationMs / 1000)}${r.boundingStage ? html`; bounded by <strong>${r.boundingStage}</strong>` : ''}</p>
<table id="run-disks"><thead><tr><th>disk</th><th>result</th><th>where the time went</th><th>read</th><th>written</th><th>rate</th></tr></thead><tbody>
${r.disks.map((d) => diskRunRow(d))}
</tbody></table>
${steps(r)}`;
  return page(`Run ${r.runId}`, body);
}

function diskRunRow(d: DiskRun): Html {
  const busy = STAGE_ORDER.map((s) => ({ stage: s, ms: d.stages?.[s]?.busyMs ?? 0 }));
  const total = busy.reduce((a, b) => a + b.ms, 0);
  const bar = total === 0 ? html`<span class="muted">—</span>` : html`<div class="stages">${busy.filter((b) => b.ms > 0).map((b) => html`<span class="stage ${b.stage}${d.boundingStage === b.stage ? ' bounding' : ''}" style="width:${((b.ms / total) * 100).toFixed(1)}%" title="${b.stage}: ${b.ms} ms">${b.stage}${d.boundingStage === b.stage ? ' ◆' : ''}</span>`)}</div>`;
  const rate = d.bytesRead && d.durationMs ? `${formatBytes((d.bytesRead / d.durationMs) * 1000)}/s` : '—';
  return html`<tr data-disk="${d.disk}" class="${d.ok ? 'ok' : 'failed'}"><td>${d.disk}</td>
<td>${d.ok ? html`<span class="pill ok">${d.kind ?? 'ok'}</span>` : html`<span class="pill failed">failed</span> <span class="error">${d.error ?? ''}</span>`}</td>
<td>${bar}</td><td>${d.bytesRead === undefined ? '—' : formatBytes(d.bytesRead)}</td><td>${d.bytesWritten === undefined ? '—' : formatBytes(d.bytesWritten)}</td><td>${rate}</td></tr>`;
}

function steps(r: JobRunReport): Html {
  const rows: Array<[string, { ok: boolean; problems: string[] } | null]> = [
    ['retention', r.retention],
    ['verify', r.verify],
    ['replication', r.replication],
    ['health check', r.healthCheck],
  ];
  const shown = rows.filter(([, s]) => s !== null);
  if (shown.length === 0) return html``;
  return html`<h2>After the backups</h2><ul>${shown.map(([name, s]) => html`<li>${name}: <span class="pill ${s!.ok ? 'ok' : 'failed'}">${s!.ok ? 'ok' : 'failed'}</span>${s!.problems.map((p) => html`<br><span class="error">${p}</span>`)}</li>`)}</ul>`;
}

/** A disk: its chain as a timeline, its last runs, and the commands to restore or serve a backup. */
export function diskPage(status: DiskStatus, backups: BackupMetadata[], runs: Array<{ report: JobRunReport; disk: DiskRun }>): string {
  const newest = Math.max(1, ...backups.map((b) => b.bytesStored));
  const body = html`
<h1>${status.disk}</h1>
<p><span class="pill ${status.state}">${STATE_WORDS[status.state]}</span> in <code>${status.repository}</code>${status.job ? html`, job ${status.job}` : ''}: ${backups.length} backup${backups.length === 1 ? '' : 's'}, ${formatBytes(status.bytesStored)} stored.</p>
<h2>Chain</h2>
<ol class="chain">${backups.map(
    (b) => html`<li class="${b.kind}" data-id="${b.id}"><span class="bar" style="width:${Math.max(2, (b.bytesStored / newest) * 100).toFixed(1)}%"></span>
<strong>${b.kind}</strong> <code>${b.id}</code> ${b.createdAt} · ${formatBytes(b.bytesStored)}${b.checkpoint ? html` · checkpoint <code>${b.checkpoint.bitmap}</code>` : ''}
<details><summary>restore or serve this backup</summary><pre>${command('restore', status.repository, status.disk, `${status.disk}.raw`, '--backup', b.id)}
${command('serve', status.repository, status.disk, '--backup', b.id)}</pre></details></li>`,
  )}</ol>
<h2>Runs</h2>
${runs.length === 0 ? html`<p class="muted">No job run recorded for this disk.</p>` : html`<table><thead><tr><th>run</th><th>result</th><th>duration</th><th>bounded by</th><th>verify</th></tr></thead><tbody>${runs
    .slice(-20)
    .reverse()
    .map(({ report, disk }) => html`<tr><td><a href="${runLink(report.job, report.runId)}">${report.startedAt}</a></td><td><span class="pill ${disk.ok ? 'ok' : 'failed'}">${disk.ok ? disk.kind ?? 'ok' : 'failed'}</span>${disk.error ? html` <span class="error">${disk.error}</span>` : ''}</td><td>${duration(disk.durationMs / 1000)}</td><td>${disk.boundingStage ?? '—'}</td><td>${report.verify ? (report.verify.ok ? 'ok' : html`<span class="error">${report.verify.problems.join('; ')}</span>`) : '—'}</td></tr>`)}</tbody></table>`}`;
  return page(status.disk, body);
}

/** A VM: its backups (each its disks' backups at one instant), how each was made consistent, and the commands to restore or boot one. */
export function vmPage(vm: string, repository: string, records: VmRecord[]): string {
  const body = html`
<h1>VM ${vm}</h1>
<p>In <code>${repository}</code>: ${records.length} VM backup${records.length === 1 ? '' : 's'}.</p>
${records.length === 0 ? html`<p class="muted">No VM backup yet.</p>` : ''}
<ol class="chain vm">${[...records].reverse().map(
    (r) => html`<li data-id="${r.id}"><strong>${r.createdAt}</strong> <code>${r.id}</code> · ${r.quiesced ? `quiesced (frozen ${r.frozenMs ?? '?'} ms)` : r.pausedMs !== null ? `paused ${r.pausedMs} ms` : 'crash-consistent'} · ${r.definition.kind === 'libvirt' ? 'libvirt domain' : 'QEMU'}${r.checkpoint ? html` · checkpoint <code>${r.checkpoint}</code>` : ''}
<br>${Object.entries(r.disks).map(([target, id]) => html`<span class="muted">${target}</span> <code>${id}</code> `)}
<details><summary>restore or boot this VM backup</summary><pre>${command('vm', 'restore', repository, vm, `${vm}-restored`, '--backup', r.id)}
${command('vm', 'boot-check', repository, vm, '--backup', r.id)}</pre></details></li>`,
  )}</ol>`;
  return page(`VM ${vm}`, body);
}

export interface TrendSeries {
  job: string;
  disk: string;
  /** Per run, oldest first: when, seconds, bytes stored, the bounding stage. */
  points: Array<{ at: string; seconds: number; bytesWritten: number; bounding: string | null }>;
}

/** JSON inside a script element, which HTML does not unescape: only `<` must not appear (it could close the element). */
const jsonInScript = (value: unknown) => new Html(JSON.stringify(value).replace(/</g, '\\u003c'));

/** Per disk, its last runs' duration and bytes as plots (uPlot, drawn by trends.js from the embedded data). */
export function trendsPage(series: TrendSeries[], lastN: number): string {
  const body = html`
<h1>Trends</h1>
<p class="muted">The last ${lastN} successful runs of each disk: how long its backup took and what it stored; below each plot, the stage that bounded each run.</p>
${series.length === 0 ? html`<p class="muted">No job run recorded yet.</p>` : ''}
${series.map(
  (s) => html`<section class="trend" data-disk="${s.disk}" data-points="${s.points.length}">
<h2>${s.disk} <span class="muted">(${s.job})</span></h2>
<div class="plot"></div>
<script type="application/json">${jsonInScript(s.points)}</script>
<p class="bounding">${s.points.map((p) => html`<span class="stage ${p.bounding ?? ''}" title="${p.at}">${p.bounding ?? '—'}</span>`)}</p>
</section>`,
)}`;
  return page('Trends', body, ['uPlot.iife.min.js', 'trends.js']);
}
