/**
 * What a job run leaves: one JSON report in the repository,
 * `jobs/<job>/<run id>.json`, written when the run ends (history.ts reads
 * them), and a summary a person reads in the morning.
 */
import { key } from '../storage/Storage.js';
import type { PruneReport } from '../store/prune.js';
import type { ReplicationReport } from '../store/replicate.js';
import type { Repository } from '../store/repository.js';
import type { StageFigures } from '../store/stages.js';
import { checkDiskName } from '../store/names.js';
import { formatBytes } from '../util/sizes.js';
import { plural } from '../util/words.js';

/** Version 2 named each disk's and the replication's busiest stage `boundingStage` (version 1: `slowestStage`). */
export const RUN_REPORT_FORMAT = 'vhdvault-job-run/2';
const RUN_REPORT_FORMAT_V1 = 'vhdvault-job-run';

/** The stages a run's time goes to; the one with the most busy time bounded it. */
export const RUN_STAGES = ['read', 'digest', 'compress', 'write', 'replicate'] as const;
export type RunStage = (typeof RUN_STAGES)[number];

export interface DiskRun {
  disk: string;
  /** The VM whose backup this disk's is part of (vms:). */
  vm?: string;
  ok: boolean;
  error?: string;
  /** Why this backup was full when the disk already had backups (fullInterval). */
  fullBecause?: string;
  id?: string;
  kind?: 'full' | 'delta';
  mode?: string;
  blocksRead?: number;
  blocksWritten?: number;
  bytesRead?: number;
  bytesWritten?: number;
  durationMs: number;
  /** The checkpoint the delta came from (a QEMU disk), or why every block was read. */
  checkpoint?: string | null;
  note?: string;
  stages?: Record<string, StageFigures>;
  boundingStage?: string;
}

export interface VmRun {
  vm: string;
  ok: boolean;
  error?: string;
  /** The VM backup's id (vm list). */
  id?: string;
  quiesced?: boolean;
  frozenMs?: number | null;
  pausedMs?: number | null;
  durationMs: number;
}

export interface StepResult {
  ok: boolean;
  /** One line per problem. */
  problems: string[];
}

export interface JobRunReport {
  format: typeof RUN_REPORT_FORMAT;
  job: string;
  jobFile: string;
  runId: string;
  /** 'scheduled' by the daemon, 'manual' by `job run`. */
  trigger: 'manual' | 'scheduled';
  startedAt: string;
  finishedAt: string;
  durationMs: number;
  ok: boolean;
  /** Set when the run was stopped (SIGTERM) before it finished. */
  stopped?: boolean;
  /** Set when the daemon skipped this run (the previous one was still going): why. */
  skipped?: string;
  disks: DiskRun[];
  /** Each VM's backup (vms:): its disks are in `disks` too, as <vm>.<target>. */
  vms?: VmRun[];
  retention: (StepResult & { removed: string[]; merged: number; kept: number }) | null;
  verify: (StepResult & { mode: 'new' | 'all'; backups: number; blocks: number }) | null;
  replication: (StepResult & { destination: string; copied: number; full: number; bytesSent: number; pruned: number; report: Omit<ReplicationReport, 'disks'> | null }) | null;
  healthCheck: (StepResult & { checked: Array<{ disk: string; id: string; ok: boolean; problem?: string }>; booted?: Array<{ vm: string; id: string; ok: boolean; ms?: number; problem?: string }> }) | null;
  /** Busy time per stage, summed over the run's disks and its replication. */
  stages: Record<RunStage, { busyMs: number; bytes: number }>;
  /** The stage with the most busy time: what to speed up first. */
  boundingStage: RunStage | null;
}

const runsKey = (job: string) => key('jobs', checkDiskName(job));

export async function saveRunReport(repo: Repository, report: JobRunReport): Promise<void> {
  await repo.writeJson(key(runsKey(report.job), `${report.runId}.json`), report);
}

/** A report an earlier vhdvault wrote, read as the current version (history spans upgrades). */
function upgradeRunReport(read: unknown): Partial<JobRunReport> {
  const r = read as Omit<Partial<JobRunReport>, 'format'> & { format?: string };
  if (r?.format !== RUN_REPORT_FORMAT_V1) return r as Partial<JobRunReport>;
  const renamed = <T extends object>(o: T): T => {
    const { slowestStage, ...rest } = o as T & { slowestStage?: string };
    return (slowestStage !== undefined ? { ...rest, boundingStage: slowestStage } : rest) as T;
  };
  const replication = r.replication?.report ? { ...r.replication, report: renamed(r.replication.report) } : r.replication;
  return { ...r, format: RUN_REPORT_FORMAT, disks: Array.isArray(r.disks) ? r.disks.map(renamed) : r.disks, replication };
}

/** Every run report of `job` (or of every job), oldest first; unreadable ones are told to `onProblem`. */
export async function loadRunReports(repo: Repository, job?: string, onProblem: (message: string) => void = () => undefined): Promise<JobRunReport[]> {
  const jobs = job !== undefined ? [job] : await repo.storage.list('jobs').catch(() => []);
  const out: JobRunReport[] = [];
  for (const j of jobs) {
    const names = await repo.storage.list(runsKey(j)).catch(() => [] as string[]);
    for (const name of names.filter((n) => n.endsWith('.json'))) {
      const k = key(runsKey(j), name);
      try {
        const r = upgradeRunReport(await repo.readJson(k));
        if (r?.format !== RUN_REPORT_FORMAT || typeof r.startedAt !== 'string' || !Array.isArray(r.disks)) throw new Error('not a job run report');
        out.push(r as JobRunReport);
      } catch (err) {
        onProblem(`${repo.storage.describe(k)}: ${(err as Error).message}`);
      }
    }
  }
  return out.sort((a, b) => a.startedAt.localeCompare(b.startedAt) || a.runId.localeCompare(b.runId));
}

/** Sum the stages of the disks and the replication; the bounding one has the most busy time. */
export function runStages(disks: DiskRun[], replication: ReplicationReport | null): Pick<JobRunReport, 'stages' | 'boundingStage'> {
  const stages = Object.fromEntries(RUN_STAGES.map((s) => [s, { busyMs: 0, bytes: 0 }])) as JobRunReport['stages'];
  for (const d of disks) {
    for (const s of ['read', 'digest', 'compress', 'write'] as const) {
      const f = d.stages?.[s];
      if (f) {
        stages[s].busyMs += f.busyMs;
        stages[s].bytes += f.bytes;
      }
    }
  }
  if (replication) {
    // Replication's own read and write are one transfer: its slower half is what it costs.
    const r = replication.stages[replication.boundingStage];
    stages.replicate = { busyMs: r.busyMs, bytes: r.bytes };
  }
  const busiest = RUN_STAGES.reduce((a, b) => (stages[b].busyMs > stages[a].busyMs ? b : a));
  return { stages, boundingStage: stages[busiest].busyMs > 0 ? busiest : null };
}

const secs = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

/** The summary a person reads: one line per disk and per step, the problems in full. */
export function describeRun(r: JobRunReport): string[] {
  if (r.skipped) return [`job ${r.job} run ${r.runId} (${r.trigger}): SKIPPED, ${r.skipped}`];
  const lines = [`job ${r.job} run ${r.runId} (${r.trigger}): ${r.ok ? 'ok' : r.stopped ? 'STOPPED' : 'FAILED'} in ${secs(r.durationMs)}${r.boundingStage ? `, bounded by ${r.boundingStage}` : ''}`];
  const width = Math.max(4, ...r.disks.map((d) => d.disk.length));
  for (const d of r.disks) {
    if (!d.ok) {
      lines.push(`  ${d.disk.padEnd(width)}  FAILED  ${d.error}`);
      continue;
    }
    const why = d.fullBecause ? ` (${d.fullBecause})` : d.note ? ` (${d.note})` : '';
    lines.push(`  ${d.disk.padEnd(width)}  ${d.kind!.padEnd(5)}  read ${formatBytes(d.bytesRead ?? 0)}, wrote ${formatBytes(d.bytesWritten ?? 0)} in ${secs(d.durationMs)}, bounded by ${d.boundingStage}${why}`);
  }
  const step = (name: string, s: StepResult | null, detail: string) => {
    if (!s) return;
    lines.push(`  ${name}: ${s.ok ? 'ok' : 'FAILED'}, ${detail}`);
    for (const p of s.problems) lines.push(`    ${p}`);
  };
  step('retention', r.retention, r.retention ? `${r.retention.removed.length} removed, ${r.retention.merged} merged` : '');
  step('verify', r.verify, r.verify ? `${r.verify.mode}: ${plural(r.verify.backups, 'backup')}, ${plural(r.verify.blocks, 'block')} re-read` : '');
  step('replication', r.replication, r.replication ? `to ${r.replication.destination}: ${r.replication.copied} copied (${r.replication.full} full), ${formatBytes(r.replication.bytesSent)} sent, ${r.replication.pruned} pruned there` : '');
  for (const v of r.vms ?? []) {
    const how = v.quiesced ? `frozen ${v.frozenMs} ms` : v.pausedMs !== null && v.pausedMs !== undefined ? `paused ${v.pausedMs} ms` : 'crash-consistent';
    lines.push(v.ok ? `  VM ${v.vm}: backup ${v.id}, every disk at one instant, ${how}` : `  VM ${v.vm}: FAILED  ${v.error}`);
  }
  const booted = r.healthCheck?.booted ?? [];
  const bootText = booted.length > 0 ? `; ${booted.filter((b) => b.ok).length} of ${booted.length} VM backups booted` : '';
  step('health check', r.healthCheck, r.healthCheck ? `${r.healthCheck.checked.filter((c) => c.ok).length} of ${r.healthCheck.checked.length} restored and read by qemu-img${bootText}` : '');
  return lines;
}

/** A prune report folded into the run's retention step. */
export function retentionStep(reports: Array<{ disk: string; report?: PruneReport; error?: string }>): NonNullable<JobRunReport['retention']> {
  const problems: string[] = [];
  const step = { ok: true, problems, removed: [] as string[], merged: 0, kept: 0 };
  for (const { disk, report, error } of reports) {
    if (error) problems.push(`${disk}: ${error}`);
    if (!report) continue;
    step.removed.push(...report.removed.map((id) => `${disk}@${id}`));
    step.merged += report.merged;
    step.kept += report.kept.length;
    for (const r of report.refused) problems.push(`${r.disk}: ${r.problem}`);
  }
  step.ok = problems.length === 0;
  return step;
}
