/**
 * `GET /metrics`: the dashboard's document in Prometheus' text format, through
 * prom-client. The per-disk and per-job figures are made anew for each scrape
 * from the repositories (a fresh registry, so a disk removed since is gone);
 * the process's own health (memory, event loop lag, file descriptors) comes
 * from prom-client's default collectors, kept for the life of the server.
 */
import { collectDefaultMetrics, Counter, Gauge, Registry } from 'prom-client';
import type { DashboardDocument, DiskState } from './dashboard.js';

const STATES: readonly DiskState[] = ['ok', 'late', 'failed', 'never', 'running', 'unscheduled', 'unreadable'];
const seconds = (iso: string) => Date.parse(iso) / 1000;

export class MetricsExporter {
  private readonly health = new Registry();

  constructor() {
    collectDefaultMetrics({ register: this.health, prefix: 'vhdvault_' });
  }

  get contentType(): string {
    return this.health.contentType;
  }

  /** The text of one scrape; `scrapeMs` is how long reading the repositories took. */
  async render(doc: DashboardDocument, scrapeMs: number): Promise<string> {
    const r = new Registry();
    const disk = ['repository', 'job', 'disk'] as const;
    const g = (name: string, help: string, labelNames: readonly string[]) => new Gauge({ name, help, labelNames, registers: [r] });
    const lastSuccess = g('vhdvault_disk_last_backup_timestamp_seconds', 'When the newest backup of the disk began (Unix time).', disk);
    const state = g('vhdvault_disk_state', 'The disk\'s protection: 1 for its current state (ok, late, failed, never, running, unscheduled, unreadable), 0 for the others.', [...disk, 'state']);
    const duration = g('vhdvault_disk_last_run_duration_seconds', 'How long the disk\'s backup took in its job\'s last run.', disk);
    const result = g('vhdvault_disk_last_run_success', '1 when the disk\'s backup succeeded in its job\'s last run, 0 when it failed.', disk);
    const read = g('vhdvault_disk_last_run_read_bytes', 'Bytes the disk\'s backup read in its job\'s last run.', disk);
    const written = g('vhdvault_disk_last_run_written_bytes', 'Bytes of block data the disk\'s backup stored in its job\'s last run.', disk);
    const stored = g('vhdvault_disk_stored_bytes', 'Bytes all the disk\'s backups occupy in the repository.', disk);
    const backups = g('vhdvault_disk_backups', 'Backups the repository holds of the disk.', disk);
    for (const d of doc.disks) {
      const l = { repository: d.repository, job: d.job ?? '', disk: d.disk };
      if (d.latest) lastSuccess.set(l, seconds(d.latest.createdAt));
      for (const s of STATES) state.set({ ...l, state: s }, d.state === s ? 1 : 0);
      if (d.lastRun) {
        duration.set(l, d.lastRun.durationMs / 1000);
        result.set(l, d.lastRun.ok ? 1 : 0);
        if (d.lastRun.bytesRead !== null) read.set(l, d.lastRun.bytesRead);
        if (d.lastRun.bytesWritten !== null) written.set(l, d.lastRun.bytesWritten);
      }
      stored.set(l, d.bytesStored);
      backups.set(l, d.backups);
    }
    const job = ['repository', 'job'] as const;
    const runs = new Counter({ name: 'vhdvault_job_runs_total', help: 'Runs of the job its repository records (skipped ones not counted).', labelNames: job, registers: [r] });
    const failures = new Counter({ name: 'vhdvault_job_failed_runs_total', help: 'Runs of the job that failed.', labelNames: job, registers: [r] });
    const running = g('vhdvault_job_running', '1 while a run of the job is in progress.', job);
    const next = g('vhdvault_job_next_run_timestamp_seconds', 'When the job runs next (Unix time).', job);
    const lastRun = g('vhdvault_job_last_run_success', '1 when the job\'s last run succeeded, 0 when it failed.', job);
    for (const j of doc.jobs) {
      const l = { repository: j.repository, job: j.name };
      runs.inc(l, j.runs);
      failures.inc(l, j.failedRuns);
      running.set(l, j.running ? 1 : 0);
      if (j.nextRun) next.set(l, seconds(j.nextRun));
      if (j.lastRun) lastRun.set(l, j.lastRun.ok ? 1 : 0);
    }
    const repoBytes = g('vhdvault_repository_stored_bytes', 'Bytes the backups of the repository occupy (the sum of their sizes).', ['repository']);
    const repoBackups = g('vhdvault_repository_backups', 'Backups the repository holds.', ['repository']);
    const repoUp = g('vhdvault_repository_readable', '1 when the repository could be read at this scrape.', ['repository']);
    for (const u of doc.repositories) {
      repoBytes.set({ repository: u.repository }, u.bytesStored);
      repoBackups.set({ repository: u.repository }, u.backups);
      repoUp.set({ repository: u.repository }, u.problem === null ? 1 : 0);
    }
    g('vhdvault_scrape_duration_seconds', 'How long reading the repositories for this scrape took.', []).set(scrapeMs / 1000);
    return (await r.metrics()) + (await this.health.metrics());
  }
}
