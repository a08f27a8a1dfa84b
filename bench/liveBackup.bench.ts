/**
 * What a live backup costs the guest, as the guest feels it: 4 KiB writes by
 * fio through a qemu-storage-daemon "guest", idle, during a live backup in
 * each mode, and idle again after (docs/live-backups.md, docs/performance.md).
 *
 *   npm run bench:live              # table
 *   npm run bench:live -- --json    # one JSON object
 *
 * Environment: BENCH_SIZE_MIB (default 512), BENCH_SECONDS per fio job
 * (default 8), BENCH_REWRITE_PCT (default 90), BENCH_MAX_WRITE (default 20M),
 * BENCH_PATTERNS (default uniform,zipf,sequential), BENCH_MODES (default
 * qemu-img-read,fleecing,fleecing-no-discard,fleecing-idle-priority,direct),
 * BENCH_GUEST (qsd, the default, or vm:
 * a QEMU machine, see startVm), BENCH_IOTHREAD=1 (the guest's disk in an
 * iothread; with vm, the virtio-blk device's), BENCH_BACKUP_ARGS (more options for the measured backups,
 * e.g. "--concurrency 1"), BENCH_DIR (where to work), BENCH_FLEECING_DIR (the fleecing
 * folder; default a folder in BENCH_DIR, on the same disk as the guest's
 * image and the repository), BENCH_RESULT_NAME (the results file's name, by
 * default live plus the variant: live-tmpfs, live-vm-tmpfs-iothread…).
 *
 * The guest: qemu-storage-daemon serving a qcow2 image (file f0 → qcow2 disk0
 * → raw passthrough g0), g0 exported writable over NBD as `disk0` on a Unix
 * socket (the guest's writes go there), two QMP monitors (vhdvault holds one,
 * the bench watches on the other). Default cache mode (host page cache).
 *
 * Write patterns (fio, 4 KiB, time-based, no ramp: the first writes to each
 * cluster are the ones copy-before-write slows):
 *   uniform     randwrite over the whole disk: nearly every write is the
 *               first to its 64 KiB cluster (the worst case);
 *   zipf        randwrite with --random_distribution=zipf:1.2: hot areas
 *               rewritten, as real guests do;
 *   sequential  write, in order from the start;
 *   hot         (asked for by name only) randwrite over the first 8 MiB: a
 *               diagnosis, since after the first write to each of its 128
 *               clusters no write waits for a copy, what it shows is the
 *               cost of sharing the machine and QEMU with the backup.
 * For each pattern: idle (iodepth 1, then 8); then for each mode, the first
 * BENCH_REWRITE_PCT % of the disk rewritten with fresh data (so the backup is
 * a delta of most of the disk), `backup --qemu … --max-write BENCH_MAX_WRITE
 * --json` started, and once its export shows in QEMU (the filter is in the
 * guest's path) the same two fio jobs while it runs; then idle again. Modes:
 *   qemu-img-read        no backup: qemu-img convert reads the guest's disk
 *                        through its export at the same pace, into QEMU's null
 *                        driver: the baseline, the cost of a reader alone;
 *   fleecing             fleecing image, discard after read (the default);
 *   fleecing-no-discard  the same with --no-discard: what it was before;
 *   fleecing-idle-priority  the same with --idle-priority (SCHED_IDLE);
 *   direct               no fleecing image: copies into the repository.
 * Goals (p99 against idle in the same run): fleecing zipf ≤ 1.3×, uniform
 * ≤ 1.5×, at iodepth 1 and 8; the fleecing image's peak with discard ≤ 50%
 * of its peak without, for the same workload.
 */
import { type Daemon, startDaemon, stopper } from '../src/demo/qsd.js';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { spawn } from 'node:child_process';
import { blockExportAdd, nbdServerStart, queryBlockExports } from '../src/qmp/commands.js';
import { QmpClient } from '../src/qmp/QmpClient.js';
import { describeFilesystem, formatTable, MiB, mustRun, runCommand, type RunResult, waitForSocket, writeResults } from './lib.js';

const CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));
const BLOCK = 2 * MiB;

const PATTERNS = {
  uniform: ['--rw=randwrite'],
  zipf: ['--rw=randwrite', '--random_distribution=zipf:1.2'],
  sequential: ['--rw=write'],
  // Not in the default list: a diagnosis. After its first 128 writes nothing is copied any more: what is left is the contention.
  hot: ['--rw=randwrite', '--size=8M'],
} as const;
type Pattern = keyof typeof PATTERNS;

const MODES = {
  // Not a backup: the baseline. qemu-img reads the guest's disk through its export at the same pace, no copies, no filter.
  'qemu-img-read': { fleecing: false, extra: [] as string[] },
  fleecing: { fleecing: true, extra: [] as string[] },
  'fleecing-no-discard': { fleecing: true, extra: ['--no-discard'] },
  'fleecing-idle-priority': { fleecing: true, extra: ['--idle-priority'] },
  direct: { fleecing: false, extra: [] as string[] },
} as const;
type Mode = keyof typeof MODES;

/** p99 goals against idle, per pattern (fleecing mode). */
const GOALS: Partial<Record<Pattern, number>> = { zipf: 1.3, uniform: 1.5 };

interface FioWrite {
  iops: number;
  p50us: number;
  p99us: number;
  p999us: number;
  /** Wall-clock start and end, ms since the bench started. */
  startMs: number;
  endMs: number;
}

interface BackupReport {
  kind: string;
  mode: string;
  bytesRead: number;
  durationMs: number;
  fleecingPeakBytes: number | null;
  copiedBytes: number;
  discardedBytes: number;
}

const t0 = performance.now();
const now = () => performance.now() - t0;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function fio(uri: string, job: string[]): Promise<RunResult> {
  return mustRun('fio', ['--name=bench', '--ioengine=nbd', `--uri=${uri}`, ...job, '--output-format=json']);
}

async function writes(uri: string, pattern: Pattern, iodepth: number, seconds: number): Promise<FioWrite> {
  const startMs = now();
  const r = await fio(uri, [...PATTERNS[pattern], '--bs=4k', `--iodepth=${iodepth}`, '--time_based', `--runtime=${seconds}`]);
  const endMs = now();
  // fio prints "fio: connected to NBD server" before its JSON.
  const write = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0].write;
  const pct = write.clat_ns.percentile as Record<string, number>;
  const us = (p: string) => pct[p]! / 1000;
  return { iops: write.iops, p50us: us('50.000000'), p99us: us('99.000000'), p999us: us('99.900000'), startMs, endMs };
}

/**
 * Sequential 1 MiB writes of fresh random data over [0, bytes). Fresh: fio
 * seeds its buffers' generator the same way every run unless told a seed, and
 * a rewrite with the bytes of the first fill would change no block.
 */
async function fill(uri: string, bytes: number): Promise<void> {
  const seed = Math.floor(Math.random() * 2 ** 32);
  await fio(uri, ['--rw=write', '--bs=1M', '--iodepth=4', '--refill_buffers', `--randseed=${seed}`, `--size=${bytes}`]);
}

type GuestKind = 'qsd' | 'vm';

/** The guest's disk under qemu-storage-daemon (qsd) or a QEMU machine (vm), with a monitor for the bench to watch on. */
async function startGuest(dir: string, size: number, kind: GuestKind, iothread: boolean): Promise<Daemon & { watchSocket: string }> {
  const image = join(dir, 'disk.qcow2');
  await mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(size)]);
  if (kind === 'vm') return startVm(dir, image, iothread);
  const daemon = await startDaemon(dir, image, { watchMonitor: true, iothread });
  return { ...daemon, watchSocket: daemon.watchSocket! };
}

/**
 * qemu-system-x86_64 with the disk on a virtio-blk device, in an iothread when
 * asked: what a user's VM has. Its CPU never starts (-S, no guest code: no
 * emulation cost in the figures). The guest's writes come through an NBD
 * export of the device's node g0, which runs in the device's thread, and pass
 * the same copy-before-write filter a virtio write would.
 */
async function startVm(dir: string, image: string, iothread: boolean): Promise<Daemon & { watchSocket: string }> {
  const qmpSocket = join(dir, 'qmp.sock');
  const watchSocket = join(dir, 'qmp2.sock');
  const nbdSocket = join(dir, 'nbd.sock');
  const child = spawn('qemu-system-x86_64', [
    ...['-M', 'q35', '-nodefaults', '-display', 'none', '-S'],
    ...(iothread ? ['-object', 'iothread,id=io0'] : []),
    ...['-blockdev', `driver=file,node-name=f0,filename=${image}`],
    ...['-blockdev', 'driver=qcow2,node-name=disk0,file=f0'],
    ...['-blockdev', 'driver=raw,node-name=g0,file=disk0'],
    // share-rw: the NBD export writes beside the device.
    ...['-device', `virtio-blk-pci,drive=g0,id=vd0,share-rw=on${iothread ? ',iothread=io0' : ''}`],
    ...['-chardev', `socket,path=${qmpSocket},server=on,wait=off,id=m0`, '-mon', 'chardev=m0,mode=control'],
    ...['-chardev', `socket,path=${watchSocket},server=on,wait=off,id=m1`, '-mon', 'chardev=m1,mode=control'],
  ], { stdio: ['ignore', 'ignore', 'inherit'] });
  const stop = stopper(child);
  try {
    await Promise.all([waitForSocket(qmpSocket), waitForSocket(watchSocket)]);
    const qmp = await QmpClient.connect(watchSocket);
    try {
      await nbdServerStart(qmp, nbdSocket);
      await blockExportAdd(qmp, { type: 'nbd', id: 'guest', nodeName: 'g0', name: 'disk0', writable: true });
    } finally {
      await qmp.close();
    }
  } catch (err) {
    await stop();
    throw err;
  }
  return { qmpSocket, watchSocket, nbdSocket, guestUri: `nbd+unix:///disk0?socket=${nbdSocket}`, stop };
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
  backup: BackupReport & { wallSeconds: number; fioWithinBackup: boolean; cpuSeconds: number | null };
}

/** GNU time's line (-f below): the child's user and system CPU seconds. */
const CPU_LINE = /^vv-cpu (\d+\.\d+) (\d+\.\d+)$/m;

/** Run a command under GNU time when it is installed, for the CPU it spent; its report is the last stderr line. */
async function timedRun(cmd: string, args: string[]): Promise<RunResult & { cpuSeconds: number | null }> {
  if (!hasGnuTime) return { ...(await runCommand(cmd, args)), cpuSeconds: null };
  const r = await runCommand('/usr/bin/time', ['-f', 'vv-cpu %U %S', cmd, ...args]);
  const m = CPU_LINE.exec(r.stderr);
  return { ...r, stderr: r.stderr.replace(CPU_LINE, '').trim(), cpuSeconds: m ? Number(m[1]) + Number(m[2]) : null };
}
const hasGnuTime = existsSync('/usr/bin/time');

interface Context {
  size: number;
  repo: string;
  g: Daemon;
  watch: QmpClient;
  fleecing: string;
  maxWrite: string;
  depths: number[];
  seconds: number;
  rewriteBytes: number;
  backupArgs: string[];
  log: (s: string) => void;
}

/** The fio jobs of `pattern` while a live backup in `mode` runs, after rewriting most of the disk. */
async function duringBackup(c: Context, pattern: Pattern, mode: Mode): Promise<During> {
  c.log(`${pattern}, ${mode}: rewrite ${c.rewriteBytes / MiB} MiB, then a live backup at --max-write ${c.maxWrite} with fio while it runs`);
  await fill(c.g.guestUri, c.rewriteBytes);
  const m = MODES[mode];
  const start = now();
  const baseline = mode === 'qemu-img-read';
  const running = baseline
    ? timedRun('qemu-img', ['convert', '-n', '-r', c.maxWrite, '-f', 'raw', '--target-image-opts', c.g.guestUri, `driver=null-co,size=${c.size}`])
    : timedRun(process.execPath, liveBackupArgs(c.repo, c.g, m.fleecing ? c.fleecing : null, '--max-write', c.maxWrite, ...m.extra, ...c.backupArgs));
  let endMs = Infinity;
  void running.then(() => (endMs = now()));
  if (!baseline) await viewExported(c.watch, running);
  const fio: FioWrite[] = [];
  for (const d of c.depths) fio.push(await writes(c.g.guestUri, pattern, d, c.seconds));
  const done = await running;
  const report = baseline ? baselineReport(done, c.size, now() - start) : parseReport(done);
  return { fio, backup: { ...report, wallSeconds: (endMs - start) / 1000, fioWithinBackup: fio.every((r) => r.endMs <= endMs), cpuSeconds: done.cpuSeconds } };
}

/** The qemu-img baseline as a report: it read the disk, copied and discarded nothing. */
function baselineReport(r: RunResult, size: number, ms: number): BackupReport {
  if (r.code !== 0) throw new Error(`qemu-img convert exited ${r.code}: ${r.stderr.trim()}`);
  return { kind: 'read', mode: 'qemu-img', bytesRead: size, durationMs: Math.round(ms), fleecingPeakBytes: null, copiedBytes: 0, discardedBytes: 0 };
}

async function idleRuns(c: Context, pattern: Pattern, label: string): Promise<FioWrite[]> {
  const out: FioWrite[] = [];
  for (const d of c.depths) {
    c.log(`${pattern}, ${label}: iodepth ${d}, ${c.seconds} s`);
    out.push(await writes(c.g.guestUri, pattern, d, c.seconds));
  }
  return out;
}

const list = <T extends string>(text: string | undefined, all: readonly T[]): T[] => {
  if (!text) return [...all];
  const given = text.split(',').map((s) => s.trim());
  for (const g of given) if (!all.includes(g as T)) throw new Error(`bench: "${g}" is not one of ${all.join(', ')}`);
  return given as T[];
};

const fmtUs = (us: number) => (us >= 1000 ? `${(us / 1000).toFixed(2)} ms` : `${us.toFixed(0)} µs`);

async function main(): Promise<void> {
  const json = process.argv.includes('--json');
  const sizeMiB = Number(process.env.BENCH_SIZE_MIB ?? 512);
  const size = sizeMiB * MiB;
  const seconds = Number(process.env.BENCH_SECONDS ?? 8);
  const rewritePct = Number(process.env.BENCH_REWRITE_PCT ?? 90);
  const maxWrite = process.env.BENCH_MAX_WRITE ?? '20M';
  const patterns = list(process.env.BENCH_PATTERNS, Object.keys(PATTERNS) as Pattern[]);
  if (!process.env.BENCH_PATTERNS) patterns.splice(patterns.indexOf('hot'), 1);
  const modes = list(process.env.BENCH_MODES, Object.keys(MODES) as Mode[]);
  const iothread = process.env.BENCH_IOTHREAD === '1';
  const guest = list(process.env.BENCH_GUEST, ['qsd', 'vm'] as const)[0]!;
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
  const g = await startGuest(work, size, guest, iothread);
  const watch = await QmpClient.connect(g.watchSocket);
  const rewriteBytes = Math.max(BLOCK, Math.floor((size * rewritePct) / 100 / BLOCK) * BLOCK);
  const backupArgs = (process.env.BENCH_BACKUP_ARGS ?? '').split(/\s+/).filter(Boolean);
  const c: Context = { size, repo, g, watch, fleecing, maxWrite, depths, seconds, rewriteBytes, backupArgs, log };
  try {
    log(`fill ${sizeMiB} MiB with random data, then a first live backup (full, unthrottled)`);
    await fill(g.guestUri, size);
    parseReport(await runCommand(process.execPath, liveBackupArgs(repo, g, fleecing)));

    const results = [];
    for (const pattern of patterns) {
      const idle = await idleRuns(c, pattern, 'idle');
      const during: Partial<Record<Mode, During>> = {};
      for (const mode of modes) during[mode] = await duringBackup(c, pattern, mode);
      const after = await idleRuns(c, pattern, 'idle after');
      results.push({ pattern, idle, during, after });
    }
    const loadAfter = loadavg().map((l) => Number(l.toFixed(2)));

    const rows = results.flatMap((r) =>
      depths.map((d, i) => {
        const idle = r.idle[i]!;
        const states = Object.fromEntries(Object.entries(r.during).map(([mode, x]) => [mode, { ...x!.fio[i]!, p99Ratio: x!.fio[i]!.p99us / idle.p99us, iopsRatio: x!.fio[i]!.iops / idle.iops }]));
        const goal = GOALS[r.pattern] ?? null;
        const fleecingRatio = states.fleecing?.p99Ratio ?? null;
        return { pattern: r.pattern, iodepth: d, idle, ...states, idleAfter: r.after[i]!, goal, goalMet: goal === null || fleecingRatio === null ? null : fleecingRatio <= goal };
      }),
    );
    const backups = results.flatMap((r) => Object.entries(r.during).map(([mode, x]) => ({ pattern: r.pattern, ...x!.backup, mode })));
    const peaks = results.map((r) => {
      const withDiscard = r.during.fleecing?.backup.fleecingPeakBytes ?? null;
      const without = r.during['fleecing-no-discard']?.backup.fleecingPeakBytes ?? null;
      return { pattern: r.pattern, withDiscard, without, ratio: withDiscard !== null && without ? withDiscard / without : null };
    });
    const fleecingFs = (await describeFilesystem(fleecing)).split(' ')[0];
    const result = {
      sizeMiB,
      seconds,
      maxWrite,
      rewritePct,
      guest,
      iothread,
      backupArgs,
      fleecingFs,
      machine: { cores: load.cores, loadavgBefore: load.before, loadavgAfter: loadAfter },
      rows,
      backups,
      peaks,
      goal: 'fleecing p99 ≤ 1.3× idle (zipf) and ≤ 1.5× idle (uniform), iodepth 1 and 8; fleecing image peak with discard ≤ 50% of without',
    };
    // Variants keep their own results file: the fleecing folder on another filesystem (live-tmpfs, …), an iothread.
    const name = `live${guest === 'vm' ? '-vm' : ''}${process.env.BENCH_FLEECING_DIR ? `-${fleecingFs}` : ''}${iothread ? '-iothread' : ''}`;
    const fleecingDir = process.env.BENCH_FLEECING_DIR ? `${fleecingFs} (${process.env.BENCH_FLEECING_DIR})` : "the same filesystem as the guest's image and the repository";
    await writeResults('live', { sizeMiB, seconds, maxWrite, rewritePct, guest, fleecingDir, iothread, backupArgs, patterns, modes }, result, { name });
    if (json) {
      console.log(JSON.stringify(result, null, 2));
      return;
    }
    console.log(`guest 4 KiB writes (fio nbd engine, ${seconds} s per job, no ramp), ${sizeMiB} MiB qcow2 under ${guest === 'vm' ? 'qemu-system-x86_64 (virtio-blk)' : 'qemu-storage-daemon'}${iothread ? ' (iothread)' : ''}; fleecing on ${fleecingFs}; ${load.cores} cores, load ${load.before.join(' ')} → ${loadAfter.join(' ')}`);
    const table: string[][] = [];
    for (const r of rows) {
      const line = (state: string, x: FioWrite) => [r.pattern, String(r.iodepth), state, x.iops.toFixed(0), fmtUs(x.p50us), fmtUs(x.p99us), fmtUs(x.p999us), `${(x.p99us / r.idle.p99us).toFixed(2)}×`];
      table.push(line('idle', r.idle));
      for (const mode of modes) table.push(line(mode, (r as unknown as Record<string, FioWrite>)[mode]!));
      table.push(line('idle after', r.idleAfter));
    }
    console.log(formatTable(['pattern', 'iodepth', 'state', 'IOPS', 'p50', 'p99', 'p99.9', 'p99 vs idle'], table));
    for (const b of backups) {
      const peak = b.fleecingPeakBytes === null ? '' : `, fleecing peak ${(b.fleecingPeakBytes / MiB).toFixed(1)} MiB`;
      const cpu = b.cpuSeconds === null ? '' : `, CPU ${((b.cpuSeconds * 1000) / (b.bytesRead / MiB)).toFixed(1)} ms per MiB read`;
      console.log(`${b.pattern}, ${b.mode}: ${b.kind} in ${b.wallSeconds.toFixed(1)} s, read ${(b.bytesRead / MiB).toFixed(0)} MiB${cpu}, copied ${(b.copiedBytes / MiB).toFixed(1)} MiB, discarded ${(b.discardedBytes / MiB).toFixed(0)} MiB${peak}${b.fioWithinBackup ? '' : '; WARNING: the backup ended before fio did'}`);
    }
    for (const p of peaks) if (p.ratio !== null) console.log(`${p.pattern}: fleecing peak with discard ${(p.ratio * 100).toFixed(0)}% of without (goal ≤ 50%)`);
    for (const r of rows) if (r.goal !== null && r.goalMet !== null) console.log(`goal ${r.pattern} iodepth ${r.iodepth}: fleecing p99 ≤ ${r.goal}× idle: ${((r as unknown as Record<string, { p99Ratio: number }>).fleecing!.p99Ratio).toFixed(2)}× — ${r.goalMet ? 'met' : 'not met'}`);
  } finally {
    await watch.close().catch(() => undefined);
    await g.stop();
    await rm(work, { recursive: true, force: true });
    await rm(fleecing, { recursive: true, force: true });
  }
}

await main();
