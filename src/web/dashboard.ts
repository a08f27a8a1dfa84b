/**
 * What the dashboard shows, as one document: every job, every disk it backs
 * up with the state of its protection measured against the job's schedule,
 * and every repository's usage. Read from what the repositories hold (their
 * backups' metadata and the jobs' run reports) and from what the daemon
 * knows now (runs in progress, next runs). It never writes to a repository:
 * listing a disk here takes no reader's lock and finishes no merge, so a
 * page may show a merge's disk half-updated for the second it takes.
 */
import type { Job } from '../jobs/jobFile.js';
import { loadRunReports, type DiskRun, type JobRunReport } from '../jobs/runReport.js';
import { nextRunAfter, previousRunBefore } from '../jobs/schedule.js';
import type { BackupMetadata } from '../store/metadata.js';
import { Repository } from '../store/repository.js';
import { vmNames } from '../store/vmRecord.js';

import { DASHBOARD_FORMAT } from './format.js';

export { DASHBOARD_FORMAT };

/**
 * `ok`: backed up since the schedule last fired; `late`: not; `failed`: its
 * last run failed; `never`: no backup yet; `running`: its job runs now;
 * `unscheduled`: in a repository no job given here backs up into;
 * `unreadable`: its repository could not be read (the problem says why).
 */
export type DiskState = 'ok' | 'late' | 'failed' | 'never' | 'running' | 'unscheduled' | 'unreadable';

export interface BackupSummary {
  id: string;
  kind: 'full' | 'delta';
  createdAt: string;
  bytesWritten: number;
  bytesStored: number;
  size: number;
}

export interface DiskStatus {
  disk: string;
  vm: string | null;
  job: string | null;
  repository: string;
  state: DiskState;
  /** The newest backup, and its age in seconds at `generatedAt`. */
  latest: BackupSummary | null;
  ageSeconds: number | null;
  backups: number;
  /** Bytes every backup of the disk occupies. */
  bytesStored: number;
  /** The disk's last run in a job: when, whether it succeeded, why not, how long. */
  lastRun: { job: string; runId: string; startedAt: string; ok: boolean; error: string | null; durationMs: number; bytesRead: number | null; bytesWritten: number | null; boundingStage: string | null } | null;
  /** Progress of the run in progress, 0 to 1, when the daemon knows it. */
  progress: number | null;
  /** Why the disk's repository could not be read (state `unreadable`). */
  problem?: string;
}

export interface JobStatus {
  name: string;
  file: string;
  repository: string;
  schedule: string;
  timezone: string | null;
  nextRun: string | null;
  running: { runId: string | null; startedAt: string } | null;
  lastRun: { runId: string; startedAt: string; finishedAt: string; ok: boolean; stopped: boolean; durationMs: number; trigger: string } | null;
  runs: number;
  failedRuns: number;
}

export interface RepositoryUsage {
  repository: string;
  disks: number;
  backups: number;
  bytesStored: number;
  /** Why the repository could not be read, when it could not. */
  problem: string | null;
}

export interface DashboardDocument {
  format: typeof DASHBOARD_FORMAT;
  generatedAt: string;
  jobs: JobStatus[];
  disks: DiskStatus[];
  repositories: RepositoryUsage[];
}

/** What the process serving the page knows that the repositories do not. */
export interface LiveState {
  /** Runs in progress by job name. */
  running(job: string): { runId: string | null; startedAt: string; progress: Map<string, number> } | null;
  /** The next scheduled run, when a daemon schedules the job; undefined: compute it from the schedule. */
  nextRun?(job: string): Date | null | undefined;
}

export const NO_LIVE_STATE: LiveState = { running: () => null };

/** How long one repository may take to be read for a page: past it, it is shown unreadable (a scrape must not time out). */
export const REPOSITORY_READ_LIMIT_MS = 8_000;

/**
 * Everything a page needs; `open` gives the repository at a path (the caller
 * keeps them open). A repository that cannot be read, or not within
 * REPOSITORY_READ_LIMIT_MS, is listed with its problem, and the jobs backing
 * up into it with their disks as `unreadable`: a disk never drops out of
 * sight (or out of an alert) because its repository did.
 */
export async function readDashboard(jobs: readonly Job[], repositories: readonly string[], open: (path: string) => Promise<Repository>, live: LiveState, now = new Date()): Promise<DashboardDocument> {
  const doc: DashboardDocument = { format: DASHBOARD_FORMAT, generatedAt: now.toISOString(), jobs: [], disks: [], repositories: [] };
  const roots = [...new Set([...jobs.map((j) => j.repository), ...repositories])];
  // All at once: one slow repository costs its time limit once, not once per repository after it.
  const reads = await Promise.all(roots.map((root) => withinLimit(readOnce(root, open), `did not answer within ${REPOSITORY_READ_LIMIT_MS / 1000} s`).catch((err: unknown) => err as Error)));
  for (const [i, root] of roots.entries()) {
    const own = jobs.filter((j) => j.repository === root);
    const read = reads[i]!;
    if (read instanceof Error) {
      const problem = read.message.split('\n')[0]!;
      doc.repositories.push({ repository: root, disks: 0, backups: 0, bytesStored: 0, problem });
      for (const job of own) {
        doc.jobs.push(jobStatus(job, [], live, now));
        for (const d of jobDisks(job, [], new Map())) doc.disks.push(unreadableDisk(d.disk, d.vm, job, root, problem, live));
      }
      continue;
    }
    const { backups, reports, vms } = read;
    const claimed = new Set<string>();
    for (const job of own) {
      const ownReports = reports.filter((r) => r.job === job.name);
      doc.jobs.push(jobStatus(job, ownReports, live, now));
      for (const d of jobDisks(job, ownReports, backups)) {
        claimed.add(d.disk);
        doc.disks.push(diskStatus(d.disk, d.vm, job, root, backups.get(d.disk) ?? [], ownReports, live, now));
      }
    }
    // A disk no job given here names: a VM's when the repository keeps that VM's backups; its last run from any job's reports.
    const vmOf = (disk: string) => vms.find((vm) => disk.startsWith(`${vm}.`)) ?? null;
    for (const [disk, list] of backups) if (!claimed.has(disk)) doc.disks.push(diskStatus(disk, vmOf(disk), null, root, list, reports, live, now));
    const all = [...backups.values()].flat();
    doc.repositories.push({ repository: root, disks: backups.size, backups: all.length, bytesStored: sum(all.map((b) => b.bytesStored)), problem: null });
  }
  return doc;
}

interface RepositoryRead {
  backups: Map<string, BackupMetadata[]>;
  reports: JobRunReport[];
  vms: string[];
}

/**
 * A read of the repository still going is joined, not doubled: a store that
 * never answers (its requests time out only after minutes) holds one read,
 * however many pages are asked for meanwhile.
 */
const inFlight = new Map<string, Promise<RepositoryRead>>();

function readOnce(root: string, open: (path: string) => Promise<Repository>): Promise<RepositoryRead> {
  let read = inFlight.get(root);
  if (!read) {
    read = readRepository(root, open);
    inFlight.set(root, read);
    const done = () => inFlight.delete(root);
    read.then(done, done);
  }
  return read;
}

async function readRepository(root: string, open: (path: string) => Promise<Repository>): Promise<RepositoryRead> {
  const repo = await open(root);
  // The repository kept open may have gone since (its folder removed): its configuration says so.
  await Repository.configOf(root);
  return { backups: await backupsByDisk(repo), reports: await loadRunReports(repo), vms: await vmNames(repo).catch(() => [] as string[]) };
}

function withinLimit<T>(work: Promise<T>, problem: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(problem)), REPOSITORY_READ_LIMIT_MS);
  });
  return Promise.race([work, late]).finally(() => clearTimeout(timer));
}

function unreadableDisk(disk: string, vm: string | null, job: Job, repository: string, problem: string, live: LiveState): DiskStatus {
  const running = live.running(job.name);
  return { disk, vm, job: job.name, repository, state: running ? 'running' : 'unreadable', latest: null, ageSeconds: null, backups: 0, bytesStored: 0, lastRun: null, progress: running?.progress.get(disk) ?? null, problem };
}

const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);

/** Each disk's committed backups, oldest first; a disk whose metadata cannot be read lists what can be. */
async function backupsByDisk(repo: Repository): Promise<Map<string, BackupMetadata[]>> {
  const out = new Map<string, BackupMetadata[]>();
  for (const disk of await repo.disks()) out.set(disk, await repo.backups(disk).catch(() => []));
  return out;
}

/** The disks a job backs up: those it names, those its runs recorded (a VM's), and a VM's that exist in the repository. */
function jobDisks(job: Job, reports: JobRunReport[], backups: Map<string, BackupMetadata[]>): Array<{ disk: string; vm: string | null }> {
  const found = new Map<string, string | null>();
  for (const d of job.disks) found.set(d.name, null);
  for (const vm of job.vms) {
    for (const disk of backups.keys()) if (disk.startsWith(`${vm.name}.`)) found.set(disk, vm.name);
  }
  for (const r of reports) for (const d of r.disks) if (!found.has(d.disk) && (d.vm === undefined || job.vms.some((v) => v.name === d.vm))) found.set(d.disk, d.vm ?? null);
  // A VM never backed up has no disk names yet: one row stands for it.
  for (const vm of job.vms) if (![...found.values()].includes(vm.name)) found.set(vm.name, vm.name);
  return [...found].map(([disk, vm]) => ({ disk, vm }));
}

function jobStatus(job: Job, reports: JobRunReport[], live: LiveState, now: Date): JobStatus {
  const last = reports.filter((r) => !r.skipped).at(-1);
  const running = live.running(job.name);
  const scheduled = live.nextRun?.(job.name);
  const next = scheduled === undefined ? nextRunAfter(job, now) : scheduled;
  return {
    name: job.name,
    file: job.file,
    repository: job.repository,
    schedule: job.schedule,
    timezone: job.timezone,
    nextRun: next?.toISOString() ?? null,
    running: running ? { runId: running.runId, startedAt: running.startedAt } : null,
    lastRun: last ? { runId: last.runId, startedAt: last.startedAt, finishedAt: last.finishedAt, ok: last.ok, stopped: last.stopped === true, durationMs: last.durationMs, trigger: last.trigger } : null,
    runs: reports.filter((r) => !r.skipped).length,
    failedRuns: reports.filter((r) => !r.skipped && !r.ok).length,
  };
}

function diskStatus(disk: string, vm: string | null, job: Job | null, repository: string, backups: BackupMetadata[], reports: JobRunReport[], live: LiveState, now: Date): DiskStatus {
  const latest = backups.at(-1) ?? null;
  let lastRun: DiskStatus['lastRun'] = null;
  for (const r of reports) {
    const d: DiskRun | undefined = r.disks.find((x) => x.disk === disk);
    if (d) lastRun = { job: r.job, runId: r.runId, startedAt: r.startedAt, ok: d.ok, error: d.error ?? null, durationMs: d.durationMs, bytesRead: d.bytesRead ?? null, bytesWritten: d.bytesWritten ?? null, boundingStage: d.boundingStage ?? null };
  }
  const running = job ? live.running(job.name) : null;
  const progress = running?.progress.get(disk) ?? null;
  return {
    disk,
    vm,
    job: job?.name ?? null,
    repository,
    state: stateOf(job, latest, lastRun, running !== null, now),
    latest: latest ? { id: latest.id, kind: latest.kind, createdAt: latest.createdAt, bytesWritten: latest.bytesWritten, bytesStored: latest.bytesStored, size: latest.size } : null,
    ageSeconds: latest ? Math.max(0, Math.round((now.getTime() - Date.parse(latest.createdAt)) / 1000)) : null,
    backups: backups.length,
    bytesStored: sum(backups.map((b) => b.bytesStored)),
    lastRun,
    progress,
  };
}

/**
 * Running first (a run is fixing whatever else it would say); then a failed
 * last run; then no backup at all; then late: the newest backup began before
 * the schedule last fired, so that run did not back the disk up.
 */
function stateOf(job: Job | null, latest: BackupMetadata | null, lastRun: DiskStatus['lastRun'], running: boolean, now: Date): DiskState {
  if (running) return 'running';
  if (lastRun && !lastRun.ok) return 'failed';
  if (!latest) return 'never';
  if (!job) return 'unscheduled';
  const fired = previousRunBefore(job, now);
  return fired && Date.parse(latest.createdAt) < fired.getTime() && !(lastRun && Date.parse(lastRun.startedAt) >= fired.getTime() && lastRun.ok) ? 'late' : 'ok';
}
