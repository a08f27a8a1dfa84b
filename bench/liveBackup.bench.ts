/**
 * What a live backup costs the guest: 4 KiB random writes measured with fio
 * through a qemu-storage-daemon "guest" while idle, while a fleecing-mode
 * live backup runs against it, and while a direct-mode one does
 * (docs/live-backups.md).
 *
 *   npm run bench:live              # 1 GiB, table
 *   npm run bench:live -- --json    # one JSON object
 *
 * Environment: BENCH_SIZE_MIB (default 1024), BENCH_SECONDS per fio job
 * (default 10), BENCH_REWRITE_PCT (default 90), BENCH_MAX_WRITE (default 20M),
 * BENCH_DIR (where to work), BENCH_FLEECING_DIR (the fleecing folder; default
 * a folder in BENCH_DIR, on the same disk as the guest's image and the repository).
 *
 * The guest: qemu-storage-daemon serving a qcow2 image (file f0 → qcow2 disk0
 * → raw passthrough g0), g0 exported writable over NBD as `disk0` on a Unix
 * socket (the guest's writes go there), two QMP monitors (vhdvault holds one,
 * the bench watches on the other). Default cache mode (host page cache).
 *
 * Sequence: fill the whole disk with random data (fio, 1 MiB sequential
 * writes); a first live backup (full, unthrottled); rewrite the first
 * BENCH_REWRITE_PCT % of the disk with fresh random data, so the measured
 * backup is a delta of most of the disk (every rewritten block is dirty in the
 * checkpoint bitmap and differs from the stored one); then
 *   (a) idle: fio randwrite 4k at iodepth 1, then 8, no backup;
 *   (b) fleecing: start `backup --qemu … --fleecing … --max-write 20M --json`,
 *       wait until its export is shown in QEMU (the point in time has passed:
 *       copy-before-write is in the guest's path), then the same two fio jobs
 *       while it runs; the backup's duration, copies and fleecing image peak
 *       come from its --json report;
 *   (c) direct: rewrite the same share of the disk again, then the same with
 *       `backup --qemu … --max-write 20M` (no --fleecing): the copies go to
 *       the repository at the --max-write pace;
 *   idle again after the backups ended, as a measure of run-to-run noise.
 * fio jobs are time-based without ramp (the first writes to each cluster are
 * the ones copy-before-write slows). Goal: fleecing p99 ≤ 1.5 × idle p99.
 */
import { type Daemon, startDaemon } from '../src/demo/qsd.js';
import { mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { queryBlockExports } from '../src/qmp/commands.js';
import { QmpClient } from '../src/qmp/QmpClient.js';
import { describeFilesystem, formatTable, MiB, mustRun, runCommand, type RunResult, writeResults } from './lib.js';

const CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));
const BLOCK = 2 * MiB;

interface FioWrite {
  iops: number;
  p50us: number;
  p99us: number;
  /** Wall-clock start and end, ms since the bench started. */
  startMs: number;
  endMs: number;
}

interface BackupReport {
  id: string;
  kind: string;
  mode: string;
  bytesRead: number;
  bytesWritten: number;
  durationMs: number;
  fleecingPeakBytes: number | null;
  copiedBytes: number;
  note?: string;
}

const t0 = performance.now();
const now = () => performance.now() - t0;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function fio(uri: string, job: string[]): Promise<RunResult> {
  return mustRun('fio', ['--name=bench', '--ioengine=nbd', `--uri=${uri}`, ...job, '--output-format=json']);
}

async function randwrite(uri: string, iodepth: number, seconds: number): Promise<FioWrite> {
  const startMs = now();
  const r = await fio(uri, ['--rw=randwrite', '--bs=4k', `--iodepth=${iodepth}`, '--time_based', `--runtime=${seconds}`]);
  const endMs = now();
  // fio prints "fio: connected to NBD server" before its JSON.
  const write = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0].write;
  const pct = write.clat_ns.percentile as Record<string, number>;
  return { iops: write.iops, p50us: pct['50.000000']! / 1000, p99us: pct['99.000000']! / 1000, startMs, endMs };
}

/** Sequential 1 MiB writes of fresh random data over [0, bytes). */
async function fill(uri: string, bytes: number): Promise<void> {
  await fio(uri, ['--rw=write', '--bs=1M', '--iodepth=4', '--refill_buffers', `--size=${bytes}`]);
}

/** qemu-storage-daemon as a running VM's disk (the demo's set-up), with a monitor for the bench to watch on. */
async function startGuest(dir: string, size: number): Promise<Daemon & { watchSocket: string }> {
  const image = join(dir, 'disk.qcow2');
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(size)]);
  const daemon = await startDaemon(dir, image, { watchMonitor: true });
  return { ...daemon, watchSocket: daemon.watchSocket! };
}

/** A live backup's arguments: fleecing mode into `fleecing`, direct mode when it is null. */
function liveBackupArgs(repo: string, g: Daemon, fleecing: string | null, ...extra: string[]): string[] {
  const mode = fleecing === null ? [] : ['--fleecing', fleecing];
  return [CLI, 'backup', repo, 'vm', '--qemu', g.qmpSocket, '--node', 'g0', ...mode, '--qemu-nbd', `nbd+unix:///?socket=${g.nbdSocket}`, '--json', ...extra];
}

function parseReport(r: RunResult): BackupReport {
  if (r.code !== 0) throw new Error(`live backup exited ${r.code}: ${r.stderr.trim()}`);
  return JSON.parse(r.stdout) as BackupReport;
}

/** Resolves once vhdvault's export is shown in QEMU: the filter is in the guest's path. */
async function viewExported(watch: QmpClient, backup: Promise<RunResult>): Promise<void> {
  let ended = false;
  void backup.finally(() => (ended = true));
  for (;;) {
    if (ended) throw new Error('the backup ended before its export appeared');
    if ((await queryBlockExports(watch)).some((e) => e.id.startsWith('vhdvault-'))) return;
    await sleep(20);
  }
}

interface During {
  fio: FioWrite[];
  report: BackupReport;
  wallSeconds: number;
  exportShownAfterMs: number;
  /** Every fio job ended before the backup did. */
  fioWithinBackup: boolean;
}

/** The fio jobs while a live backup (fleecing into `fleecing`, or direct when null) runs. */
async function duringBackup(repo: string, g: Daemon, watch: QmpClient, fleecing: string | null, maxWrite: string, depths: number[], seconds: number, log: (s: string) => void): Promise<During> {
  const label = fleecing === null ? 'direct' : 'fleecing';
  log(`${label}: live backup with --max-write ${maxWrite}, fio while it runs`);
  const start = now();
  const running = runCommand(process.execPath, liveBackupArgs(repo, g, fleecing, '--max-write', maxWrite));
  let endMs = Infinity;
  void running.then(() => (endMs = now()));
  await viewExported(watch, running);
  const exportShownAfterMs = now() - start;
  const fio: FioWrite[] = [];
  for (const d of depths) {
    log(`${label}: randwrite 4k iodepth ${d}, ${seconds} s`);
    fio.push(await randwrite(g.guestUri, d, seconds));
  }
  const fioWithinBackup = fio.every((r) => r.endMs <= endMs);
  const report = parseReport(await running);
  return { fio, report, wallSeconds: (endMs - start) / 1000, exportShownAfterMs, fioWithinBackup };
}

const fmtUs = (us: number) => (us >= 1000 ? `${(us / 1000).toFixed(2)} ms` : `${us.toFixed(0)} µs`);

async function main(): Promise<void> {
  const json = process.argv.includes('--json');
  const sizeMiB = Number(process.env.BENCH_SIZE_MIB ?? 1024);
  const size = sizeMiB * MiB;
  const seconds = Number(process.env.BENCH_SECONDS ?? 10);
  const rewritePct = Number(process.env.BENCH_REWRITE_PCT ?? 90);
  const maxWrite = process.env.BENCH_MAX_WRITE ?? '20M';
  const depths = [1, 8];
  const load = { before: loadavg().map((l) => Number(l.toFixed(2))), cores: cpus().length };
  const log = (s: string) => {
    if (!json) console.error(s);
  };

  // Short: Unix socket paths must fit in 108 bytes.
  const work = await mkdtemp(join(process.env.BENCH_DIR ?? tmpdir(), 'vv-live-'));
  const repo = join(work, 'repo');
  const fleecing = await mkdtemp(join(process.env.BENCH_FLEECING_DIR ?? work, 'fleece-'));
  await mustRun(process.execPath, [CLI, 'init', repo, '--layout', 'dir', '--compression', 'none']);
  const g = await startGuest(work, size);
  const watch = await QmpClient.connect(g.watchSocket);
  try {
    log(`fill ${sizeMiB} MiB with random data`);
    let t = now();
    await fill(g.guestUri, size);
    const fillSeconds = (now() - t) / 1000;

    log('first live backup (full, unthrottled)');
    const first = parseReport(await runCommand(process.execPath, liveBackupArgs(repo, g, fleecing)));

    const rewriteBytes = Math.max(BLOCK, Math.floor((size * rewritePct) / 100 / BLOCK) * BLOCK);
    log(`rewrite the first ${rewriteBytes / MiB} MiB (${rewritePct}%) with fresh random data`);
    t = now();
    await fill(g.guestUri, rewriteBytes);
    const rewriteSeconds = (now() - t) / 1000;

    const idle: FioWrite[] = [];
    for (const d of depths) {
      log(`idle: randwrite 4k iodepth ${d}, ${seconds} s`);
      idle.push(await randwrite(g.guestUri, d, seconds));
    }

    const fleecingRun = await duringBackup(repo, g, watch, fleecing, maxWrite, depths, seconds, log);
    log(`rewrite the first ${rewriteBytes / MiB} MiB again`);
    await fill(g.guestUri, rewriteBytes);
    const directRun = await duringBackup(repo, g, watch, null, maxWrite, depths, seconds, log);

    const after: FioWrite[] = [];
    for (const d of depths) {
      log(`idle after: randwrite 4k iodepth ${d}, ${seconds} s`);
      after.push(await randwrite(g.guestUri, d, seconds));
    }
    const loadAfter = loadavg().map((l) => Number(l.toFixed(2)));

    const rows = depths.map((d, i) => {
      const a = idle[i]!;
      const f = fleecingRun.fio[i]!;
      const c = directRun.fio[i]!;
      const p99Ratio = f.p99us / a.p99us;
      return {
        iodepth: d,
        idle: a,
        fleecing: f,
        direct: c,
        idleAfter: after[i]!,
        iopsRatio: f.iops / a.iops,
        p99Ratio,
        goalMet: p99Ratio <= 1.5,
        directIopsRatio: c.iops / a.iops,
        directP99Ratio: c.p99us / a.p99us,
      };
    });
    const backupOf = (r: During) => ({
      kind: r.report.kind,
      mode: r.report.mode,
      durationMs: r.report.durationMs,
      wallSeconds: r.wallSeconds,
      exportShownAfterMs: r.exportShownAfterMs,
      bytesRead: r.report.bytesRead,
      bytesWritten: r.report.bytesWritten,
      copiedBytes: r.report.copiedBytes,
      fleecingPeakBytes: r.report.fleecingPeakBytes,
      fioWithinBackup: r.fioWithinBackup,
      note: r.report.note ?? null,
    });
    const result = {
      sizeMiB,
      seconds,
      maxWrite,
      machine: { cores: load.cores, loadavgBefore: load.before, loadavgAfter: loadAfter },
      setup: {
        fillSeconds,
        firstBackup: { kind: first.kind, durationMs: first.durationMs, bytesRead: first.bytesRead, bytesWritten: first.bytesWritten, fleecingPeakBytes: first.fleecingPeakBytes },
        rewritePct,
        rewriteBytes,
        rewriteSeconds,
      },
      fleecingDir: fleecing,
      backups: { fleecing: backupOf(fleecingRun), direct: backupOf(directRun) },
      rows,
      goal: 'fleecing p99 ≤ 1.5 × idle p99',
    };
    // Variants keep their own results file: the fleecing folder on another filesystem (live-tmpfs, …), or a slower backup.
    const fleecingFs = (await describeFilesystem(fleecing)).split(' ')[0];
    const name = process.env.BENCH_FLEECING_DIR ? `live-${fleecingFs}` : maxWrite !== '20M' ? 'live-throttled' : 'live';
    const fleecingDir = process.env.BENCH_FLEECING_DIR ? `${fleecingFs} (${process.env.BENCH_FLEECING_DIR})` : "the same filesystem as the guest's image and the repository";
    await writeResults('live', { sizeMiB, seconds, maxWrite, rewritePct, fleecingDir }, result, { name });
    if (json) {
      console.log(JSON.stringify(result, null, 2));
      return;
    }
    console.log(`guest 4 KiB random writes (fio nbd engine, ${seconds} s per job, no ramp), ${sizeMiB} MiB qcow2 under qemu-storage-daemon; ${load.cores} cores, load ${load.before.join(' ')} → ${loadAfter.join(' ')}`);
    console.log(
      `setup: fill ${fillSeconds.toFixed(1)} s; first live backup ${first.kind} ${(first.durationMs / 1000).toFixed(1)} s; rewrote ${rewriteBytes / MiB} MiB (${rewritePct}%) in ${rewriteSeconds.toFixed(1)} s`,
    );
    const row = (state: string, d: number, r: FioWrite | null) =>
      r ? [state, String(d), r.iops.toFixed(0), fmtUs(r.p50us), fmtUs(r.p99us)] : [state, String(d), 'not available', '—', '—'];
    const table: string[][] = [];
    for (const [i, d] of depths.entries()) {
      table.push(row('(a) idle', d, idle[i]!));
      table.push(row('(b) fleecing backup', d, fleecingRun.fio[i]!));
      table.push(row('(c) direct backup', d, directRun.fio[i]!));
      table.push(row('idle after (noise)', d, after[i]!));
    }
    console.log(formatTable(['state', 'iodepth', 'IOPS', 'p50', 'p99'], table));
    for (const [label, r] of [['(b)', fleecingRun], ['(c)', directRun]] as const) {
      const b = r.report;
      const peak = b.fleecingPeakBytes === null ? '' : `, fleecing peak ${(b.fleecingPeakBytes / MiB).toFixed(1)} MiB`;
      console.log(
        `backup during ${label}: ${b.mode} ${b.kind}, --max-write ${maxWrite}, ${(b.durationMs / 1000).toFixed(1)} s (wall ${r.wallSeconds.toFixed(1)} s, export shown after ${(r.exportShownAfterMs / 1000).toFixed(1)} s), read ${(b.bytesRead / MiB).toFixed(0)} MiB, wrote ${(b.bytesWritten / MiB).toFixed(0)} MiB, copied ${(b.copiedBytes / MiB).toFixed(1)} MiB before guest writes${peak}${r.fioWithinBackup ? '' : '; WARNING: the backup ended before fio did'}`,
      );
    }
    console.log(`fleecing folder: ${fleecing}`);
    for (const r of rows) {
      console.log(`goal fleecing p99 ≤ 1.5× idle, iodepth ${r.iodepth}: ${r.p99Ratio.toFixed(2)}× — ${r.goalMet ? 'met' : 'not met'} (IOPS ${r.iopsRatio.toFixed(2)}× idle); direct p99 ${r.directP99Ratio.toFixed(2)}× idle (IOPS ${r.directIopsRatio.toFixed(2)}×)`);
    }
  } finally {
    await watch.close().catch(() => undefined);
    await g.stop();
    await rm(work, { recursive: true, force: true });
    await rm(fleecing, { recursive: true, force: true });
  }
}

await main();
