/**
 * `vhdvault daemon`: every job of the given files and folders on its
 * schedule. Never two runs of one job at once: a run due while the previous
 * one still goes is skipped and reported. A run missed while the daemon was
 * down (the schedule fired between the job's last recorded run and now) is
 * reported at start and not replayed: the next scheduled run catches up, as
 * a delta. SIGHUP reloads the job files (a file that no longer parses keeps
 * its previous version and says why); SIGTERM stops scheduling, stops the
 * runs in progress (their backups abort cleanly, no partial backup stays)
 * and exits once they have ended.
 */
import { readdir, realpath, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { Repository } from '../store/repository.js';
import { newBackupId } from '../store/names.js';
import { type Job, loadJob } from './jobFile.js';
import { runJob } from './runJob.js';
import { type JobRunReport, loadRunReports, RUN_REPORT_FORMAT, saveRunReport } from './runReport.js';
import { delayUntil, nextRunAfter, previousRunBefore } from './schedule.js';

export interface DaemonEvent {
  event: 'started' | 'listening' | 'loaded' | 'invalid' | 'missed' | 'run' | 'finished' | 'skipped' | 'removed' | 'reloading' | 'stopping' | 'stopped';
  job?: string;
  file?: string;
  message: string;
}

interface Scheduled {
  job: Job;
  timer: NodeJS.Timeout | null;
  /** The run in progress, if any. */
  running: Promise<void> | null;
  stop: AbortController | null;
  next: Date | null;
  /** When the run in progress began, and each of its disks' progress (0 to 1) while it is backed up. */
  startedAt: string | null;
  progress: Map<string, number>;
}

const isJobFile = (name: string) => /\.ya?ml$/i.test(name);

export class JobDaemon {
  private readonly jobs = new Map<string, Scheduled>();
  private stopping = false;

  constructor(
    private readonly paths: string[],
    private readonly emit: (e: DaemonEvent) => void,
  ) {}

  /** Load every job file, report missed runs, schedule them all. */
  async start(): Promise<void> {
    this.emit({ event: 'started', message: `watching ${this.paths.join(', ')}` });
    await this.load(true);
  }

  /** SIGHUP: read the job files again; running jobs finish under the version they started with. */
  async reload(): Promise<void> {
    this.emit({ event: 'reloading', message: 'reloading job files' });
    await this.load(false);
  }

  /** SIGTERM: no more runs; the ones in progress are stopped and awaited. */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    const running = [...this.jobs.values()].filter((s) => s.running);
    this.emit({ event: 'stopping', message: running.length ? `stopping ${running.length} run(s) in progress` : 'no run in progress' });
    for (const s of this.jobs.values()) {
      if (s.timer) clearTimeout(s.timer);
      s.stop?.abort();
    }
    await Promise.all(running.map((s) => s.running));
    this.emit({ event: 'stopped', message: 'stopped' });
  }

  /** Each job file once, however often the paths name it (a file, and its folder). */
  private async jobFiles(): Promise<string[]> {
    const files: string[] = [];
    for (const p of this.paths) {
      const path = resolve(p);
      const s = await stat(path).catch(() => null);
      if (s?.isDirectory()) files.push(...(await readdir(path)).filter(isJobFile).sort().map((n) => join(path, n)));
      else files.push(path); // a missing file is reported by loadJob
    }
    const real = await Promise.all(files.map((f) => realpath(f).catch(() => f)));
    return [...new Set(real)];
  }

  private async load(first: boolean): Promise<void> {
    const files = await this.jobFiles();
    for (const file of files) {
      let job: Job;
      try {
        job = await loadJob(file);
      } catch (err) {
        const kept = this.jobs.has(file) ? ' (its previous version stays scheduled)' : '';
        // A job file's problems, each a line: one event's message is one line.
        this.emit({ event: 'invalid', file, message: `${(err as Error).message.replaceAll('\n', '; ')}${kept}` });
        continue;
      }
      const clash = [...this.jobs.entries()].find(([f, s]) => f !== file && s.job.name === job.name);
      if (clash) {
        this.emit({ event: 'invalid', file, message: `${file}: job name "${job.name}" is already used by ${clash[0]}` });
        continue;
      }
      const current = this.jobs.get(file);
      if (current?.timer) clearTimeout(current.timer);
      const entry: Scheduled = current ? Object.assign(current, { job, timer: null }) : { job, timer: null, running: null, stop: null, next: null, startedAt: null, progress: new Map() };
      this.jobs.set(file, entry);
      if (first) await this.reportMissed(job);
      this.arm(entry);
      this.emit({ event: 'loaded', job: job.name, file, message: `${job.name}: ${job.schedule}${job.timezone ? ` (${job.timezone})` : ''}, next run ${entry.next?.toISOString() ?? 'never'}` });
    }
    for (const [file, entry] of this.jobs) {
      if (files.includes(file)) continue;
      if (entry.timer) clearTimeout(entry.timer);
      this.jobs.delete(file);
      this.emit({ event: 'removed', job: entry.job.name, file, message: `${entry.job.name}: job file gone, no longer scheduled${entry.running ? ' (its run in progress finishes)' : ''}` });
    }
  }

  /** A scheduled time between the job's last recorded run and now: said once, not replayed. */
  private async reportMissed(job: Job): Promise<void> {
    const repo = await Repository.open(job.repository).catch(() => null);
    if (!repo) return;
    const last = (await loadRunReports(repo, job.name)).at(-1);
    if (!last) return;
    const missed = previousRunBefore(job, new Date());
    if (missed && missed.getTime() > Date.parse(last.startedAt)) {
      this.emit({ event: 'missed', job: job.name, message: `${job.name}: the run due at ${missed.toISOString()} was missed (the daemon was not running; last run ${last.startedAt}): not replayed, the next run takes a delta of everything since` });
    }
  }

  private arm(entry: Scheduled): void {
    if (this.stopping) return;
    const next = nextRunAfter(entry.job, new Date());
    entry.next = next;
    if (!next) return;
    const wait = () => {
      // A timer holds at most ~24.8 days: wake up and wait again until the time comes.
      if (Date.now() < next.getTime() - 5) {
        entry.timer = setTimeout(wait, delayUntil(next));
        return;
      }
      entry.timer = null;
      this.fire(entry, next);
    };
    entry.timer = setTimeout(wait, delayUntil(next));
  }

  private fire(entry: Scheduled, due: Date): void {
    const { job } = entry;
    this.arm(entry);
    if (entry.running) {
      this.emit({ event: 'skipped', job: job.name, message: `${job.name}: the run due at ${due.toISOString()} is skipped: the previous run is still going` });
      void this.recordSkipped(job, due);
      return;
    }
    this.emit({ event: 'run', job: job.name, message: `${job.name}: run due at ${due.toISOString()} starts` });
    this.begin(entry, 'scheduled');
  }

  private begin(entry: Scheduled, trigger: 'scheduled' | 'manual'): void {
    const { job } = entry;
    const stop = new AbortController();
    entry.stop = stop;
    entry.startedAt = new Date().toISOString();
    entry.progress = new Map();
    const progress = (unit: string, f: { done: number; total: number } | null) => {
      if (f === null) entry.progress.delete(unit);
      else entry.progress.set(unit, f.total > 0 ? f.done / f.total : 0);
    };
    entry.running = runJob(job, { trigger, signal: stop.signal, progress })
      .then(
        (r) => this.emit({ event: 'finished', job: job.name, message: `${job.name}: run ${r.runId} ${r.ok ? 'ok' : r.stopped ? 'stopped' : 'FAILED'} in ${(r.durationMs / 1000).toFixed(1)} s${failures(r)}` }),
        (err: Error) => this.emit({ event: 'finished', job: job.name, message: `${job.name}: run FAILED: ${err.message}` }),
      )
      .finally(() => {
        entry.running = null;
        entry.stop = null;
        entry.startedAt = null;
        entry.progress = new Map();
      });
  }

  /** The jobs scheduled now. */
  scheduledJobs(): Job[] {
    return [...this.jobs.values()].map((s) => s.job);
  }

  /** The job's run in progress, or null. */
  running(name: string): { runId: null; startedAt: string; progress: Map<string, number> } | null {
    const entry = this.entry(name);
    return entry?.running && entry.startedAt ? { runId: null, startedAt: entry.startedAt, progress: entry.progress } : null;
  }

  nextRun(name: string): Date | null | undefined {
    const entry = this.entry(name);
    return entry ? entry.next : undefined;
  }

  /** A run of the job now, outside its schedule (the dashboard's "run now"): null, or why not. */
  runNow(name: string): string | null {
    const entry = this.entry(name);
    if (!entry) return `no job named ${JSON.stringify(name)}`;
    if (this.stopping) return 'the daemon is stopping';
    if (entry.running) return `${name} is running (since ${entry.startedAt ?? '?'}): one run of a job at a time`;
    this.emit({ event: 'run', job: name, message: `${name}: run asked for now starts` });
    this.begin(entry, 'manual');
    return null;
  }

  private entry(name: string): Scheduled | undefined {
    return [...this.jobs.values()].find((s) => s.job.name === name);
  }

  /** A skipped run is part of the job's history too. */
  private async recordSkipped(job: Job, due: Date): Promise<void> {
    try {
      const repo = await Repository.open(job.repository);
      const now = new Date().toISOString();
      const report: JobRunReport = {
        format: RUN_REPORT_FORMAT,
        job: job.name,
        jobFile: job.file,
        runId: newBackupId(),
        trigger: 'scheduled',
        startedAt: now,
        finishedAt: now,
        durationMs: 0,
        ok: false,
        skipped: `due at ${due.toISOString()} while the previous run was still going`,
        disks: [],
        retention: null,
        verify: null,
        replication: null,
        healthCheck: null,
        stages: { read: { busyMs: 0, bytes: 0 }, digest: { busyMs: 0, bytes: 0 }, compress: { busyMs: 0, bytes: 0 }, write: { busyMs: 0, bytes: 0 }, replicate: { busyMs: 0, bytes: 0 } },
        boundingStage: null,
      };
      await saveRunReport(repo, report);
    } catch (err) {
      this.emit({ event: 'skipped', job: job.name, message: `${job.name}: could not record the skipped run: ${(err as Error).message}` });
    }
  }
}

function failures(r: JobRunReport): string {
  const failed = r.disks.filter((d) => !d.ok).map((d) => d.disk);
  return failed.length ? ` (failed: ${failed.join(', ')})` : '';
}
