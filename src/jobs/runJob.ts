/**
 * One run of a job: every disk backed up (at most `concurrency` at once,
 * each in its own process, so one failing disk never stops the others),
 * then retention, verify, replication and the health check, each step on
 * the disks it concerns; a step's failure is reported and the next one still
 * runs. The report is written into the repository last (runReport.ts).
 */
import pLimit from 'p-limit';
import { newBackupId } from '../store/names.js';
import { prune } from '../store/prune.js';
import { replicate, type ReplicationReport } from '../store/replicate.js';
import { Repository } from '../store/repository.js';
import { verify } from '../store/verify.js';
import { bootCheckVm } from '../live/bootCheck.js';
import type { VmBackupReport } from '../live/vmBackup.js';
import { vmDiskName, vmRecords } from '../store/vmRecord.js';
import type { OnProgress } from '../util/progress.js';
import { backupArgs, backupDisk, backupVm, type DiskOutcome, type Outcome, vmBackupArgs } from './diskBackup.js';
import { healthCheck } from './healthCheck.js';
import type { Job, JobDisk, JobVm } from './jobFile.js';
import { type DiskRun, type JobRunReport, retentionStep, RUN_REPORT_FORMAT, runStages, saveRunReport, type VmRun } from './runReport.js';
import { targetSources } from '../crypto/password.js';

export interface RunOptions {
  trigger?: JobRunReport['trigger'];
  /** Stops the run: backups in progress abort cleanly, later steps are skipped. */
  signal?: AbortSignal;
  /** Progress lines for a person (a disk started, finished, a step begins). */
  log?: (line: string) => void;
  /** Each disk's (and VM's) progress while it is backed up, from its start; null once it is done. */
  progress?: (unit: string, figures: { done: number; total: number; bytes: number } | null) => void;
  /** Every disk and VM backed up full, whatever fullInterval says (`job run --full`). */
  full?: boolean;
}

/** Why a run started with `full` takes full backups. */
const FULL_ASKED = 'job run --full';

export async function runJob(job: Job, options: RunOptions = {}): Promise<JobRunReport> {
  const started = new Date();
  const t0 = performance.now();
  const log = options.log ?? (() => undefined);
  const stopped = () => options.signal?.aborted ?? false;
  const repo = await Repository.open(job.repository);
  const runId = newBackupId();

  const limit = pLimit(job.concurrency);
  // A unit's progress, from its start to its end, when the caller shows it.
  const watched = async <T>(unit: string, backup: (onProgress?: OnProgress) => Promise<T>): Promise<T> => {
    const progress = options.progress;
    if (!progress) return backup();
    progress(unit, { done: 0, total: 0, bytes: 0 });
    try {
      return await backup((done, total, bytes) => progress(unit, { done, total, bytes }));
    } finally {
      progress(unit, null);
    }
  };
  // A QEMU monitor serves one client at a time: disks behind one QMP socket go one after another.
  const monitors = new Map<string, ReturnType<typeof pLimit>>();
  const throughMonitor = (unit: JobDisk | JobVm) => <T>(fn: () => Promise<T>): Promise<T> => (unit.kind !== 'qemu' ? fn() : (monitors.get(unit.qmp) ?? monitors.set(unit.qmp, pLimit(1)).get(unit.qmp)!)(fn));
  const vmsDone = Promise.all(
    job.vms.map((vm) =>
      limit(async (): Promise<{ run: VmRun; disks: DiskRun[] }> => {
        const fullBecause = options.full ? FULL_ASKED : await vmFullIntervalDue(repo, job, vm.name);
        if (stopped()) return { run: { vm: vm.name, ok: false, error: 'not started: the run was stopped', durationMs: 0 }, disks: [] };
        log(`VM ${vm.name}: backup${fullBecause ? ' (full)' : ''}`);
        const outcome = await throughMonitor(vm)(() => watched(`VM ${vm.name}`, (onProgress) => backupVm(vmBackupArgs(job, vm, fullBecause !== null), options.signal, onProgress)));
        const done = vmRun(vm.name, outcome, fullBecause);
        log(`VM ${vm.name}: ${done.run.ok ? `${done.run.id}, ${done.disks.length} disks at one instant` : `FAILED: ${done.run.error}`}`);
        return done;
      }),
    ),
  );
  const disksDone: DiskRun[] = await Promise.all(
    job.disks.map((disk) =>
      limit(async (): Promise<DiskRun> => {
        const fullBecause = options.full ? FULL_ASKED : await fullIntervalDue(repo, job, disk.name);
        if (stopped()) return { disk: disk.name, ok: false, error: 'not started: the run was stopped', durationMs: 0 };
        log(`${disk.name}: backup${fullBecause ? ' (full)' : ''}`);
        const outcome = await throughMonitor(disk)(() => watched(disk.name, (onProgress) => backupDisk(backupArgs(job, disk, fullBecause !== null), options.signal, onProgress)));
        const run = diskRun(disk.name, outcome, fullBecause);
        log(`${disk.name}: ${run.ok ? `${run.kind} ${run.id}` : `FAILED: ${run.error}`}`);
        return run;
      }),
    ),
  );
  const vmResults = await vmsDone;
  const vms = vmResults.map((v) => v.run);
  const disks = [...disksDone, ...vmResults.flatMap((v) => v.disks)];
  // A VM's disks, as its newest VM backup names them (this run's, or an earlier one's when this one failed).
  const vmDisks = (await Promise.all(job.vms.map((vm) => vmDiskNames(repo, vm.name)))).flat();
  const names = [...job.disks.map((d) => d.name), ...vmDisks];
  const newIds = new Set(disks.flatMap((d) => (d.id ? [d.id] : [])));

  let retention: JobRunReport['retention'] = null;
  if (job.retention && !stopped()) {
    log('retention');
    const reports = [];
    for (const disk of names) {
      if (!(await repo.latest(disk).catch(() => undefined))) continue;
      reports.push(await prune(repo, disk, { policy: job.retention }).then((report) => ({ disk, report }), (err: Error) => ({ disk, error: err.message })));
    }
    retention = retentionStep(reports);
  }

  let verifyStep: JobRunReport['verify'] = null;
  if (job.verify !== 'none' && !stopped()) {
    log(`verify (${job.verify})`);
    const step = { ok: true, problems: [] as string[], mode: job.verify, backups: 0, blocks: 0 };
    for (const disk of names) {
      if (job.verify === 'new' && !disks.some((d) => d.disk === disk && d.id)) continue;
      if (!(await repo.latest(disk).catch(() => undefined))) continue;
      try {
        const r = await verify(repo, disk, job.verify === 'new' ? { only: newIds } : {});
        step.backups += r.backups;
        step.blocks += r.blocks;
        for (const p of r.problems) step.problems.push(`${p.disk}${p.id ? `@${p.id}` : ''}${p.block !== null ? ` block ${p.block}` : ''}: ${p.problem}`);
      } catch (err) {
        step.problems.push(`${disk}: ${(err as Error).message}`);
      }
    }
    step.ok = step.problems.length === 0;
    verifyStep = step;
  }

  let replication: JobRunReport['replication'] = null;
  let replicationReport: ReplicationReport | null = null;
  if (job.replicate && !stopped()) {
    log(`replicate to ${job.replicate.repository}`);
    try {
      const dst = await Repository.open(job.replicate.repository, { password: targetSources() });
      const present = [];
      for (const disk of names) if (await repo.latest(disk).catch(() => undefined)) present.push(disk);
      replicationReport = await replicate(repo, dst, present, { ...(job.replicate.retention ? { retention: job.replicate.retention } : {}), ...(job.maxWrite !== null ? { maxWrite: job.maxWrite } : {}) });
      const { disks: perDisk, ...summary } = replicationReport;
      const problems = perDisk.flatMap((d) => (d.error ? [`${d.disk}: ${d.error}`] : []));
      const t = replicationReport.totals;
      replication = { ok: problems.length === 0, problems, destination: job.replicate.repository, copied: t.copied, full: t.full, bytesSent: t.bytesSent, pruned: t.pruned, report: summary };
    } catch (err) {
      replication = { ok: false, problems: [(err as Error).message], destination: job.replicate.repository, copied: 0, full: 0, bytesSent: 0, pruned: 0, report: null };
    }
  }

  let health: JobRunReport['healthCheck'] = null;
  if (job.healthCheck && !stopped()) {
    log('health check');
    try {
      const checked = await healthCheck(repo, names, job.healthCheck.scratch);
      const problems = checked.flatMap((c) => (c.ok ? [] : [`${c.disk}@${c.id}: ${c.problem}`]));
      const booted = job.healthCheck.boot ? await bootVms(repo, job, options.signal) : [];
      problems.push(...booted.flatMap((b) => (b.ok ? [] : [`VM ${b.vm}@${b.id}: ${b.problem}`])));
      health = { ok: problems.length === 0, problems, checked, ...(job.healthCheck.boot ? { booted } : {}) };
    } catch (err) {
      health = { ok: false, problems: [(err as Error).message], checked: [] };
    }
  }

  const steps = [retention, verifyStep, replication, health];
  const report: JobRunReport = {
    format: RUN_REPORT_FORMAT,
    job: job.name,
    jobFile: job.file,
    runId,
    trigger: options.trigger ?? 'manual',
    startedAt: started.toISOString(),
    finishedAt: new Date().toISOString(),
    durationMs: Math.round(performance.now() - t0),
    ok: !stopped() && disks.every((d) => d.ok) && vms.every((v) => v.ok) && steps.every((s) => s === null || s.ok),
    ...(stopped() ? { stopped: true } : {}),
    disks,
    ...(vms.length > 0 ? { vms } : {}),
    retention,
    verify: verifyStep,
    replication,
    healthCheck: health,
    ...runStages(disks, replicationReport),
  };
  await saveRunReport(repo, report);
  return report;
}

/**
 * Why this disk's next backup must be full under `fullInterval` N: its chain
 * since the last full already holds N-1 deltas. Null: a delta will do (or it
 * is the first backup, full anyway).
 */
async function fullIntervalDue(repo: Repository, job: Job, disk: string): Promise<string | null> {
  if (job.fullInterval === null) return null;
  const backups = await repo.backups(disk).catch(() => []);
  const byId = new Map(backups.map((b) => [b.id, b]));
  let deltas = 0;
  for (let b = backups.at(-1); b && b.parent !== null; b = byId.get(b.parent)) deltas++;
  if (backups.length === 0 || deltas < job.fullInterval - 1) return null;
  return `fullInterval ${job.fullInterval}: ${deltas} ${deltas === 1 ? 'delta' : 'deltas'} since the last full`;
}

/** `healthCheck: boot`: each VM's newest backup booted (vm boot-check), one after another (each is a whole guest). */
async function bootVms(repo: Repository, job: Job, signal?: AbortSignal): Promise<NonNullable<NonNullable<JobRunReport['healthCheck']>['booted']>> {
  const booted = [];
  for (const vm of job.vms) {
    if (signal?.aborted) break;
    if ((await vmRecords(repo, vm.name).catch(() => [])).length === 0) continue;
    const r = await bootCheckVm(repo, vm.name, { scratch: job.healthCheck?.scratch ?? undefined, signal }).catch((err: Error) => ({ vm: vm.name, id: '', ok: false, ms: 0, problem: err.message }));
    booted.push({ vm: r.vm, id: r.id, ok: r.ok, ms: r.ms, ...(r.problem ? { problem: r.problem } : {}) });
  }
  return booted;
}

/** A VM is due a full backup when any of its disks is (fullInterval). */
async function vmFullIntervalDue(repo: Repository, job: Job, vm: string): Promise<string | null> {
  for (const disk of await vmDiskNames(repo, vm)) {
    const why = await fullIntervalDue(repo, job, disk);
    if (why !== null) return `${why} (${disk})`;
  }
  return null;
}

/** The repository disks of a VM, as its newest VM backup names them ([] before the first). */
async function vmDiskNames(repo: Repository, vm: string): Promise<string[]> {
  const latest = (await vmRecords(repo, vm).catch(() => [])).at(-1);
  return latest ? Object.keys(latest.disks).map((t) => vmDiskName(vm, t)) : [];
}

/** A VM's backup in the run report: the VM's own line, and each of its disks' as a disk of the run. */
function vmRun(vm: string, outcome: Outcome<VmBackupReport>, fullBecause: string | null): { run: VmRun; disks: DiskRun[] } {
  if (!outcome.ok) return { run: { vm, ok: false, error: outcome.error, durationMs: outcome.durationMs }, disks: [{ disk: vm, vm, ok: false, error: outcome.error, durationMs: outcome.durationMs }] };
  const r = outcome.report;
  const disks = Object.entries(r.disks).map(([target, report]) => ({ ...diskRun(vmDiskName(vm, target), { ok: true, report, durationMs: report.durationMs }, fullBecause), vm }));
  return { run: { vm, ok: true, id: r.id, quiesced: r.quiesced, frozenMs: r.frozenMs, pausedMs: r.pausedMs, durationMs: outcome.durationMs }, disks };
}

function diskRun(disk: string, outcome: DiskOutcome, fullBecause: string | null): DiskRun {
  if (!outcome.ok) return { disk, ok: false, error: outcome.error, durationMs: outcome.durationMs };
  const r = outcome.report;
  return {
    disk,
    ok: true,
    ...(fullBecause ? { fullBecause } : {}),
    id: r.id,
    kind: r.kind,
    ...(r.mode ? { mode: r.mode } : {}),
    blocksRead: r.blocksRead,
    blocksWritten: r.blocksWritten,
    bytesRead: r.bytesRead,
    bytesWritten: r.bytesWritten,
    durationMs: r.durationMs,
    ...(r.previousCheckpoint !== undefined ? { checkpoint: r.previousCheckpoint } : {}),
    ...(r.note ? { note: r.note } : {}),
    stages: r.stages,
    boundingStage: r.boundingStage,
  };
}
