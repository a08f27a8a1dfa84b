/**
 * `job history`: the runs a repository's reports record, and per disk how
 * its backups trend — duration, bytes, the stage that bounded them — so a
 * disk getting slower shows before it misses its window.
 */
import { formatBytes } from '../util/sizes.js';
import { plural } from '../util/words.js';
import type { JobRunReport } from './runReport.js';

/** `job history --json` and the dashboard's /api/history: {runs, trends}. */
export const JOB_HISTORY_FORMAT = 'vhdvault-job-history/1';

export interface DiskTrend {
  job: string;
  disk: string;
  runs: number;
  failed: number;
  /** Latest successful backup's duration, and the median of the earlier ones of the same kind (a full against fulls, a delta against deltas). */
  lastMs: number | null;
  medianBeforeMs: number | null;
  /** last ÷ median before: above 1, the disk is getting slower. */
  slowdown: number | null;
  lastBytesWritten: number | null;
  /** How often each stage bounded the disk's backups. */
  bounding: Record<string, number>;
}

const median = (xs: number[]) => {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

export function diskTrends(reports: JobRunReport[]): DiskTrend[] {
  const byDisk = new Map<string, { job: string; disk: string; runs: JobRunReport['disks'] }>();
  for (const r of reports) {
    for (const d of r.disks) {
      const k = `${r.job}\0${d.disk}`;
      const entry = byDisk.get(k) ?? byDisk.set(k, { job: r.job, disk: d.disk, runs: [] }).get(k)!;
      entry.runs.push(d);
    }
  }
  return [...byDisk.values()].map(({ job, disk, runs }) => {
    const ok = runs.filter((d) => d.ok);
    const last = ok.at(-1);
    const before = median(ok.slice(0, -1).filter((d) => d.kind === last?.kind).map((d) => d.durationMs));
    const bounding: Record<string, number> = {};
    for (const d of ok) if (d.boundingStage) bounding[d.boundingStage] = (bounding[d.boundingStage] ?? 0) + 1;
    return {
      job,
      disk,
      runs: runs.length,
      failed: runs.length - ok.length,
      lastMs: last?.durationMs ?? null,
      medianBeforeMs: before,
      slowdown: last && before ? Math.round((last.durationMs / before) * 100) / 100 : null,
      lastBytesWritten: last?.bytesWritten ?? null,
      bounding,
    };
  });
}

const secs = (ms: number | null) => (ms === null ? '—' : `${(ms / 1000).toFixed(1)} s`);

/** The table a person reads: one line per run, then one per disk's trend. */
export function describeHistory(reports: JobRunReport[]): string[] {
  const lines = ['started                   job         result   disks  written      duration  bounded by'];
  for (const r of reports) {
    const ok = r.disks.filter((d) => d.ok).length;
    const written = r.disks.reduce((n, d) => n + (d.bytesWritten ?? 0), 0);
    const result = r.ok ? 'ok' : r.skipped ? 'skipped' : r.stopped ? 'stopped' : 'FAILED';
    lines.push(`${r.startedAt.padEnd(25)} ${r.job.padEnd(11)} ${result.padEnd(8)} ${`${ok}/${r.disks.length}`.padEnd(6)} ${formatBytes(written).padEnd(12)} ${secs(r.durationMs).padEnd(9)} ${r.boundingStage ?? '—'}`);
  }
  const trends = diskTrends(reports);
  if (trends.length > 0) lines.push('', 'per disk (latest backup against the median of the earlier ones of its kind):');
  for (const t of trends) {
    const trend = t.slowdown === null ? '' : ` (${t.slowdown >= 1 ? '+' : ''}${Math.round((t.slowdown - 1) * 100)}%)`;
    const stages = Object.entries(t.bounding).sort((a, b) => b[1] - a[1]).map(([s, n]) => `${s} ${n}×`).join(', ');
    lines.push(`  ${t.job}/${t.disk}: ${plural(t.runs, 'run')}, ${t.failed} failed; duration ${secs(t.lastMs)} vs ${secs(t.medianBeforeMs)}${trend}; bounded by ${stages || '—'}`);
  }
  return lines;
}
