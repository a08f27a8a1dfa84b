/**
 * vhdvault against the tools users would pick instead: the same disk, the same
 * delta, the same steps, through borg, restic and vhdvault, each driven as its
 * own process, interleaved, several rounds.
 *
 *   npm run bench:peers                 # 1 GiB disk, 3 rounds, table
 *   npm run bench:peers -- --json       # the results as JSON on stdout
 *
 * Environment:
 *   BENCH_SIZE_MIB  disk size (default 1024)
 *   BENCH_ROUNDS    rounds (default 3); each round runs every tool once, the order rotating
 *   BENCH_DIR       where to work (default: the OS temp dir); a temp dir is made inside and removed
 *   BENCH_TOOLS     comma-separated subset of vhdvault,borg,restic (default: all present)
 *   BENCH_PARTS     comma-separated subset of steps,nbd,convert,probe,locality (default: all): steps
 *                   are the four steps of every tool, nbd the vhdvault delta from a dirty bitmap,
 *                   convert the VHD → raw comparison, probe the durability probe, locality the
 *                   delta sizes for writes of 4 KiB, 64 KiB and 1 MiB; leaving some
 *                   out shortens a run spent on the others (the JSON then lacks their rows)
 *
 * Installs nothing: a tool (borg, restic, qemu-img, qemu-nbd, qemu-io, strace,
 * /usr/bin/time) that is missing is skipped, and the output says so. On Debian:
 * `apt-get install borgbackup restic qemu-utils strace time` (fio is for
 * bench:nbd).
 *
 * The disk: writeSeededDisk (80% seeded random data, 20% zero runs), the zero
 * runs then punched into holes (fallocate --dig-holes). The delta: 1% of the
 * disk rewritten in place as seeded 4 KiB writes at scattered 4 KiB-aligned
 * offsets (seededScatteredWrites), the same bytes for every tool.
 *
 * Per tool and round, in a fresh repository and cache: full backup; the writes;
 * delta backup of the same file; restore of the latest (checked equal to the
 * disk); retention down to one backup (vhdvault prune --keep-last 1, which
 * merges; borg prune --keep-last 1 then borg compact; restic forget
 * --keep-last 1 --prune). Each step is timed alone and under /usr/bin/time
 * (peak RSS); `sync` runs before it (so no step pays for an earlier one's
 * writeback) and after it, timed apart ("then sync"): what a tool left
 * unflushed shows there. Repository bytes (`du -sb`) after each step; the
 * tools' local caches (borg's files and chunks caches, restic's cache) are
 * measured apart and not in the repository figure.
 *
 * vhdvault only: the delta from a qemu dirty bitmap (the same writes replayed
 * by qemu-io into a qcow2 copy of the disk carrying a persistent bitmap,
 * exported by qemu-nbd -B; `backup --source nbd+unix://… --bitmap`), against
 * the delta from the file, with the bytes each read. Then, once, the same 1%
 * of the disk changed in writes of 4 KiB, 64 KiB and 1 MiB: how many 2 MiB
 * blocks each touches, and what vhdvault's delta reads and stores from the
 * file and from a dirty bitmap (sizes only, not timed).
 *
 * Conversion: `vhdvault vhd convert` VHD → raw (which fsyncs its output)
 * against `qemu-img convert -f vpc -O raw` followed by an fsync of the output,
 * both timed with the fsync. `serve` against `qemu-nbd` is bench:nbd.
 *
 * Durability: once per run, on a 16 MiB disk, every step of every tool runs
 * under `strace -f -c` counting fsync, fdatasync, syncfs, sync and
 * sync_file_range: the table states what each tool asked the kernel to make
 * durable, measured rather than quoted.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  applySeededWrites,
  describeFilesystem,
  envInt,
  formatTable,
  fsyncFile,
  median,
  MiB,
  mustRun,
  runCommand,
  sameContent,
  seededScatteredWrites,
  type SeededWrite,
  waitForSocket,
  writeResults,
  writeSeededDisk,
} from './lib.js';

const CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));
const FORMAT = 'vhdvault-bench-peers/1';
const DATA_SHARE = 0.8;
const DELTA_SHARE = 0.01;
const WRITE_SIZE = 4096;
const DISK_SEED = 1;
const WRITES_SEED = 3;
const PROBE_MIB = 16;
const SYNC_CALLS = ['fsync', 'fdatasync', 'syncfs', 'sync', 'sync_file_range'] as const;

type ToolName = 'vhdvault' | 'borg' | 'restic';
type Step = 'full' | 'delta' | 'restore' | 'retention';
const STEPS: Step[] = ['full', 'delta', 'restore', 'retention'];

/** One command of a step: what to run, where, with which environment. */
interface Cmd {
  cmd: string;
  args: string[];
  cwd?: string;
}

/** A tool's settings for one round: its repository and cache, and how to run each step. */
interface Tool {
  name: ToolName;
  /** Commands it needs on PATH. */
  needs: string[];
  version(): Promise<string>;
  /** The settings that make the comparison fair, as a user would pass them. */
  settings: string;
  env(repo: string, cache: string): Record<string, string>;
  init(repo: string): Cmd[];
  /** The n-th backup (1, 2, …) of `disk`. */
  backup(repo: string, disk: string, n: number): Cmd[];
  /** Restore the latest backup into `outDir`; returns the commands and where the disk lands. */
  restore(repo: string, disk: string, outDir: string): { cmds: Cmd[]; file: string };
  retain(repo: string): Cmd[];
}

const node = (args: string[]): Cmd => ({ cmd: process.execPath, args: [CLI, ...args] });

const TOOLS: Tool[] = [
  {
    name: 'vhdvault',
    needs: [],
    version: async () => `vhdvault ${(await mustRun(process.execPath, [CLI, '--version'])).stdout.trim()}`,
    settings: 'layout dir, --compression none',
    env: () => ({}),
    init: (repo) => [node(['init', repo, '--layout', 'dir', '--compression', 'none'])],
    backup: (repo, disk) => [node(['backup', repo, 'disk', '--source', disk, '--json'])],
    restore: (repo, _disk, out) => ({ cmds: [node(['restore', repo, 'disk', join(out, 'disk.raw')])], file: join(out, 'disk.raw') }),
    retain: (repo) => [node(['prune', repo, 'disk', '--keep-last', '1'])],
  },
  {
    name: 'borg',
    needs: ['borg'],
    version: async () => (await mustRun('borg', ['--version'])).stdout.trim(),
    settings: 'init -e none, create --compression none (default chunker buzhash 19,23,21,4095)',
    env: (_repo, cache) => ({
      BORG_BASE_DIR: cache,
      BORG_PASSPHRASE: '',
      BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK: 'yes',
      BORG_RELOCATED_REPO_ACCESS_IS_OK: 'yes',
    }),
    init: (repo) => [{ cmd: 'borg', args: ['init', '-e', 'none', repo] }],
    backup: (repo, disk, n) => [{ cmd: 'borg', args: ['create', '--compression', 'none', `${repo}::b${n}`, disk] }],
    // The latest is the second backup. borg extract writes the archived path (without its leading /) under the working folder.
    restore: (repo, disk, out) => ({ cmds: [{ cmd: 'borg', args: ['extract', `${repo}::b2`], cwd: out }], file: join(out, disk.replace(/^\//, '')) }),
    retain: (repo) => [
      { cmd: 'borg', args: ['prune', '--keep-last', '1', repo] },
      { cmd: 'borg', args: ['compact', repo] },
    ],
  },
  {
    name: 'restic',
    needs: ['restic'],
    version: async () => (await mustRun('restic', ['version'])).stdout.trim().split(' compiled')[0]!,
    settings: 'init --repository-version 2, backup --compression off',
    env: (repo, cache) => ({ RESTIC_REPOSITORY: repo, RESTIC_PASSWORD: 'x', RESTIC_CACHE_DIR: cache }),
    init: () => [{ cmd: 'restic', args: ['init', '--repository-version', '2'] }],
    backup: (_repo, disk) => [{ cmd: 'restic', args: ['backup', '--compression', 'off', disk] }],
    restore: (_repo, disk, out) => ({ cmds: [{ cmd: 'restic', args: ['restore', 'latest', '--target', out] }], file: join(out, disk) }),
    retain: () => [{ cmd: 'restic', args: ['forget', '--keep-last', '1', '--prune'] }],
  },
];

/**
 * What each tool makes durable: from its documentation and source, checked by
 * hand with `strace -f -y -e trace=fsync,fdatasync,syncfs,sync_file_range` on a
 * 16 MiB disk (borg 1.2.4, restic 0.14.0, Debian bookworm); the probe below
 * counts the same calls on every run.
 */
const DURABILITY_DOCS: Record<ToolName, string> = {
  vhdvault:
    'backup: block files written unsynced, then one syncfs of the filesystem (`sync -f`, which flushes every writer\'s dirty data on that filesystem, not only the backup\'s) before the commit; digests and metadata each written under a temporary name, fsynced, renamed, the folder fsynced (design chapters 4 and 5). restore: the output under a temporary name, fdatasynced, fsynced, renamed, the folder fsynced. prune: the merge journal, block moves, bat and footer durable, each touched folder fsynced.',
  borg:
    'create and prune/compact: each segment file fdatasynced as it is closed, then its folder fsynced; at each commit the index, hints and integrity files written to temporary names, fsynced, renamed, the repository folder fsynced; also its security and cache config files. extract: nothing synced.',
  restic:
    'local backend: every file it stores (each pack, index, snapshot, lock) written to a temporary name, fsynced, renamed, and its folder fsynced. restore: nothing synced but its lock file.',
};

// ---------------------------------------------------------------- processes

interface Measured {
  seconds: number;
  /** Peak RSS of the largest process of the step, KiB (GNU time %M); null without /usr/bin/time. */
  peakKiB: number | null;
  stdout: string;
}

let haveTime = false;

function which(cmd: string): boolean {
  return (process.env.PATH ?? '').split(delimiter).some((d) => d && existsSync(join(d, cmd)));
}

/** Run one command (under /usr/bin/time when present), failing unless it exits 0. */
function runOne(c: Cmd, env: Record<string, string>, timeFile: string, prefix: string[] = []): Promise<Measured> {
  const argv = [...prefix, c.cmd, ...c.args];
  const [cmd, ...args] = haveTime ? ['/usr/bin/time', '-f', '%M', '-o', timeFile, ...argv] : argv;
  return new Promise((resolve, reject) => {
    const start = process.hrtime.bigint();
    const child = spawn(cmd!, args, { cwd: c.cwd, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', async (code) => {
      const seconds = Number(process.hrtime.bigint() - start) / 1e9;
      if (code !== 0) return reject(new Error(`${argv.join(' ')} exited ${code}: ${stderr.trim().slice(-2000)}`));
      let peakKiB: number | null = null;
      if (haveTime) {
        const lines = (await readFile(timeFile, 'utf8')).trim().split('\n');
        peakKiB = Number(lines[lines.length - 1]);
      }
      resolve({ seconds, peakKiB, stdout });
    });
  });
}

/** A step's commands one after the other: seconds summed, peak RSS the largest. */
async function runSteps(cmds: Cmd[], env: Record<string, string>, timeFile: string): Promise<Measured> {
  let seconds = 0;
  let peak: number | null = null;
  let stdout = '';
  for (const c of cmds) {
    const m = await runOne(c, env, timeFile);
    seconds += m.seconds;
    if (m.peakKiB !== null) peak = Math.max(peak ?? 0, m.peakKiB);
    stdout += m.stdout;
  }
  return { seconds, peakKiB: peak, stdout };
}

async function timedSync(): Promise<number> {
  const start = process.hrtime.bigint();
  await mustRun('sync', []);
  return Number(process.hrtime.bigint() - start) / 1e9;
}

async function du(path: string): Promise<number> {
  if (!existsSync(path)) return 0;
  return Number((await mustRun('du', ['-sb', path])).stdout.split(/\s/)[0]);
}

// ---------------------------------------------------------------- the disk

/** The seeded disk with its zero runs as holes, and the delta's writes. */
async function makeDisk(path: string, size: number): Promise<SeededWrite[]> {
  await writeSeededDisk(path, size, { seed: DISK_SEED, zeroShare: 1 - DATA_SHARE });
  if (which('fallocate')) await mustRun('fallocate', ['--dig-holes', path]);
  return seededScatteredWrites(size, DELTA_SHARE, { seed: WRITES_SEED, writeSize: WRITE_SIZE });
}

/** Replay `writes` into a qcow2 image through qemu-io, exactly (one source file per write). */
async function qemuIoWrites(image: string, writes: readonly SeededWrite[], scratch: string): Promise<void> {
  await mkdir(scratch, { recursive: true });
  for (let i = 0; i < writes.length; i += 256) {
    const batch = writes.slice(i, i + 256);
    const cmds: string[] = [];
    for (const [j, w] of batch.entries()) {
      const file = join(scratch, `w${i + j}`);
      await writeFile(file, w.data);
      cmds.push('-c', `write -q -s ${file} ${w.offset} ${w.data.length}`);
    }
    await mustRun('qemu-io', ['-f', 'qcow2', ...cmds, image]);
  }
  await rm(scratch, { recursive: true, force: true });
}

/**
 * A qcow2 copy of `base` carrying a persistent bitmap named "delta" that
 * records `writes` (replayed by qemu-io, then checked equal to the same writes
 * applied to a file), exported read-only by qemu-nbd -B on a Unix socket.
 */
async function bitmapExport(work: string, name: string, base: string, writes: readonly SeededWrite[]): Promise<{ uri: string; server: ChildProcess }> {
  const image = join(work, `${name}.qcow2`);
  const modified = join(work, `${name}-modified.raw`);
  await mustRun('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', base, image]);
  await mustRun('qemu-img', ['bitmap', '--add', image, 'delta']);
  await qemuIoWrites(image, writes, join(work, `${name}-writes`));
  await mustRun('qemu-img', ['bitmap', '--disable', image, 'delta']);
  await mustRun('cp', ['--sparse=always', base, modified]);
  await applySeededWrites(modified, writes);
  const same = await runCommand('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', modified, image]);
  await rm(modified);
  if (same.code !== 0) throw new Error('the qcow2 image with the replayed writes differs from the file with the same writes');
  const socket = join(work, `${name}.sock`);
  const server = spawn('qemu-nbd', ['-r', '-t', '-f', 'qcow2', '-x', 'disk', '-B', 'delta', '-k', socket, image], { stdio: 'ignore' });
  await waitForSocket(socket);
  return { uri: `nbd+unix:///disk?socket=${socket}`, server };
}

async function stopServer(server: ChildProcess): Promise<void> {
  if (server.exitCode !== null || server.signalCode !== null) return;
  const gone = new Promise((r) => server.once('exit', r));
  server.kill('SIGTERM');
  await gone;
}

// ---------------------------------------------------------------- delta locality

/** The sizes of the writes the locality study spreads the same 1% of the disk in. */
const LOCALITY_WRITE_SIZES = [4096, 64 * 1024, 1024 * 1024];

export interface LocalityRow {
  writeSize: number;
  writes: number;
  changedBytes: number;
  /** 2 MiB blocks holding at least one changed byte. */
  blocksTouched: number;
  blocks: number;
  fileDelta: { bytesRead: number; bytesAdded: number };
  bitmapDelta: { bytesRead: number; bytesAdded: number } | null;
}

/**
 * vhdvault only, one run per write size: the same share of the disk changed
 * in writes of 4 KiB, 64 KiB and 1 MiB, and what the delta then reads and
 * stores, from the file and from a dirty bitmap. Sizes, not times: a VHD
 * delta's unit is the 2 MiB block, so what it stores follows how many blocks
 * the writes touch, not how many bytes they change.
 */
async function localityStudy(p: Paths, size: number, withBitmap: boolean, servers: ChildProcess[], log: (s: string) => void): Promise<LocalityRow[]> {
  const rows: LocalityRow[] = [];
  const blockSize = 2 * MiB;
  for (const writeSize of LOCALITY_WRITE_SIZES) {
    const writes = seededScatteredWrites(size, DELTA_SHARE, { seed: WRITES_SEED, writeSize });
    const touched = new Set<number>();
    for (const w of writes) for (let b = Math.floor(w.offset / blockSize); b * blockSize < w.offset + w.data.length; b++) touched.add(b);
    const fileDelta = await deltaSizes(p, async (repo) => {
      await mustRun('cp', ['--sparse=always', p.base, p.disk]);
      await applySeededWrites(p.disk, writes);
      return ['backup', repo, 'disk', '--source', p.disk, '--json'];
    });
    let bitmapDelta: LocalityRow['bitmapDelta'] = null;
    if (withBitmap) {
      const exported = await bitmapExport(p.work, `locality-${writeSize}`, p.base, writes);
      servers.push(exported.server);
      try {
        bitmapDelta = await deltaSizes(p, async (repo) => ['backup', repo, 'disk', '--source', exported.uri, '--bitmap', 'delta', '--json']);
      } finally {
        await stopServer(exported.server);
        await rm(join(p.work, `locality-${writeSize}.qcow2`), { force: true });
      }
    }
    const row = { writeSize, writes: writes.length, changedBytes: writes.length * writeSize, blocksTouched: touched.size, blocks: Math.ceil(size / blockSize), fileDelta, bitmapDelta };
    rows.push(row);
    log(`bench: locality ${writeSize / 1024} KiB writes: ${row.blocksTouched}/${row.blocks} blocks touched; file delta read ${(fileDelta.bytesRead / MiB).toFixed(1)} MiB, added ${(fileDelta.bytesAdded / MiB).toFixed(1)} MiB${bitmapDelta ? `; bitmap delta read ${(bitmapDelta.bytesRead / MiB).toFixed(1)} MiB` : ''}`);
  }
  return rows;
}

/** A full backup of the disk from its file, then the delta `deltaArgs` gives: what the delta read and what it added. */
async function deltaSizes(p: Paths, deltaArgs: (repo: string) => Promise<string[]>): Promise<{ bytesRead: number; bytesAdded: number }> {
  const repo = join(p.work, 'locality-repo');
  try {
    await mustRun(process.execPath, [CLI, 'init', repo, '--layout', 'dir', '--compression', 'none']);
    await mustRun(process.execPath, [CLI, 'backup', repo, 'disk', '--source', p.base]);
    const before = await du(repo);
    const out = await mustRun(process.execPath, [CLI, ...(await deltaArgs(repo))]);
    return { bytesRead: (JSON.parse(out.stdout) as { bytesRead: number }).bytesRead, bytesAdded: (await du(repo)) - before };
  } finally {
    await rm(repo, { recursive: true, force: true });
    await rm(p.disk, { force: true });
  }
}

// ---------------------------------------------------------------- results

interface Sample {
  seconds: number;
  syncSeconds: number;
  peakKiB: number | null;
  repoBytes: number;
  cacheBytes: number;
  bytesRead?: number;
}

export interface Row {
  tool: string;
  step: string;
  rounds: number;
  /** Median seconds of the step, and [min, max]. */
  seconds: number;
  secondsRange: [number, number];
  /** Median seconds of the `sync` right after the step. */
  syncSeconds: number;
  peakRssMiB: number | null;
  peakRssMiBRange: [number, number] | null;
  /** `du -sb` of the repository after the step (median). */
  repoBytes: number;
  /** The tool's local cache after the step (median; vhdvault keeps none); not in repoBytes. */
  cacheBytes: number;
  /** This tool's median / vhdvault's median, same step (> 1: vhdvault is faster / smaller). */
  secondsVsVhdvault: number | null;
  peakRssVsVhdvault: number | null;
  repoBytesVsVhdvault: number | null;
  bytesRead?: number;
}

const round3 = (x: number) => Number(x.toFixed(3));

function summarize(tool: string, step: string, samples: Sample[]): Row {
  const s = samples.map((x) => x.seconds);
  const rss = samples.map((x) => x.peakKiB).filter((x): x is number => x !== null).map((k) => k / 1024);
  const read = samples.map((x) => x.bytesRead).filter((x): x is number => x !== undefined);
  return {
    tool,
    step,
    rounds: samples.length,
    seconds: round3(median(s)),
    secondsRange: [round3(Math.min(...s)), round3(Math.max(...s))],
    syncSeconds: round3(median(samples.map((x) => x.syncSeconds))),
    peakRssMiB: rss.length ? Number(median(rss).toFixed(1)) : null,
    peakRssMiBRange: rss.length ? [Number(Math.min(...rss).toFixed(1)), Number(Math.max(...rss).toFixed(1))] : null,
    repoBytes: Math.round(median(samples.map((x) => x.repoBytes))),
    cacheBytes: Math.round(median(samples.map((x) => x.cacheBytes))),
    secondsVsVhdvault: null,
    peakRssVsVhdvault: null,
    repoBytesVsVhdvault: null,
    ...(read.length ? { bytesRead: Math.round(median(read)) } : {}),
  };
}

function withRatios(rows: Row[]): Row[] {
  const ratio = (a: number | null, b: number | null) => (a === null || b === null || b === 0 ? null : round3(a / b));
  return rows.map((r) => {
    const base = rows.find((x) => x.tool === 'vhdvault' && x.step === r.step);
    if (!base) return r;
    return { ...r, secondsVsVhdvault: ratio(r.seconds, base.seconds), peakRssVsVhdvault: ratio(r.peakRssMiB, base.peakRssMiB), repoBytesVsVhdvault: ratio(r.repoBytes, base.repoBytes) };
  });
}

// ---------------------------------------------------------------- one tool, one round

interface Paths {
  work: string;
  disk: string;
  base: string;
  timeFile: string;
}

/** Full, the writes, delta, restore (checked), retention, in a fresh repository. */
async function roundOf(tool: Tool, p: Paths, writes: readonly SeededWrite[], out: Map<string, Sample[]>, log: (s: string) => void, round: number): Promise<void> {
  const repo = join(p.work, `${tool.name}-repo`);
  const cache = join(p.work, `${tool.name}-cache`);
  const restoreDir = join(p.work, 'restore');
  await Promise.all([repo, cache, restoreDir].map((d) => rm(d, { recursive: true, force: true })));
  await mkdir(cache, { recursive: true });
  const env = tool.env(repo, cache);
  try {
    await mustRun('cp', ['--sparse=always', p.base, p.disk]);
    await runSteps(tool.init(repo), env, p.timeFile);
    const record = async (step: Step, cmds: Cmd[]): Promise<Measured> => {
      await mustRun('sync', []);
      const m = await runSteps(cmds, env, p.timeFile);
      const syncSeconds = await timedSync();
      const sample: Sample = { seconds: m.seconds, syncSeconds, peakKiB: m.peakKiB, repoBytes: await du(repo), cacheBytes: tool.name === 'vhdvault' ? 0 : await du(cache) };
      if (tool.name === 'vhdvault' && (step === 'full' || step === 'delta')) sample.bytesRead = (JSON.parse(m.stdout) as { bytesRead: number }).bytesRead;
      (out.get(`${tool.name}\0${step}`) ?? out.set(`${tool.name}\0${step}`, []).get(`${tool.name}\0${step}`)!).push(sample);
      log(`bench: round ${round}  ${tool.name.padEnd(8)} ${step.padEnd(9)} ${m.seconds.toFixed(2)} s (+ sync ${syncSeconds.toFixed(2)} s), ${m.peakKiB === null ? '?' : (m.peakKiB / 1024).toFixed(0)} MiB peak, repository ${(sample.repoBytes / MiB).toFixed(1)} MiB`);
      return m;
    };
    await record('full', tool.backup(repo, p.disk, 1));
    await applySeededWrites(p.disk, writes);
    await record('delta', tool.backup(repo, p.disk, 2));
    await mkdir(restoreDir);
    const { cmds, file } = tool.restore(repo, p.disk, restoreDir);
    await record('restore', cmds);
    if (!(await sameContent(file, p.disk))) throw new Error(`${tool.name}: the restored disk differs from the disk backed up`);
    await rm(restoreDir, { recursive: true, force: true });
    await record('retention', tool.retain(repo));
  } finally {
    await Promise.all([repo, cache, restoreDir, p.disk].map((d) => rm(d, { recursive: true, force: true })));
  }
}

// ---------------------------------------------------------------- durability probe

interface SyncCounts {
  tool: string;
  step: string;
  /** Calls per syscall (fsync, fdatasync, syncfs, sync, sync_file_range) over every process of the step. */
  calls: Record<string, number>;
}

/** Every step of every tool on a small disk under `strace -f -c`: which sync calls each makes. */
async function durabilityProbe(tools: Tool[], work: string): Promise<SyncCounts[]> {
  const dir = join(work, 'probe');
  await mkdir(dir);
  const base = join(dir, 'base.raw');
  const disk = join(dir, 'disk.raw');
  const writes = await makeDisk(base, PROBE_MIB * MiB);
  const counts: SyncCounts[] = [];
  const traceFile = join(dir, 'strace.txt');
  const strace = async (c: Cmd, env: Record<string, string>): Promise<Record<string, number>> => {
    await runOne(c, env, join(dir, 'time.txt'), ['strace', '-f', '-qq', '-c', '-o', traceFile, '-e', `trace=${SYNC_CALLS.join(',')}`]);
    const calls: Record<string, number> = {};
    for (const line of (await readFile(traceFile, 'utf8')).split('\n')) {
      const cols = line.trim().split(/\s+/);
      const name = cols[cols.length - 1]!;
      if ((SYNC_CALLS as readonly string[]).includes(name)) calls[name] = Number(cols[3]);
    }
    return calls;
  };
  for (const tool of tools) {
    const repo = join(dir, `${tool.name}-repo`);
    const cache = join(dir, `${tool.name}-cache`);
    const out = join(dir, 'restore');
    await mkdir(cache);
    const env = tool.env(repo, cache);
    await mustRun('cp', ['--sparse=always', base, disk]);
    await runSteps(tool.init(repo), env, join(dir, 'time.txt'));
    const step = async (name: Step, cmds: Cmd[]) => {
      const calls: Record<string, number> = {};
      for (const c of cmds) for (const [k, v] of Object.entries(await strace(c, env))) calls[k] = (calls[k] ?? 0) + v;
      counts.push({ tool: tool.name, step: name, calls });
    };
    await step('full', tool.backup(repo, disk, 1));
    await applySeededWrites(disk, writes);
    await step('delta', tool.backup(repo, disk, 2));
    await mkdir(out);
    await step('restore', tool.restore(repo, disk, out).cmds);
    await step('retention', tool.retain(repo));
    await Promise.all([repo, cache, out, disk].map((d) => rm(d, { recursive: true, force: true })));
  }
  await rm(dir, { recursive: true, force: true });
  return counts;
}

// ---------------------------------------------------------------- main

async function main(): Promise<void> {
  const json = process.argv.includes('--json');
  const sizeMiB = envInt('BENCH_SIZE_MIB', 1024);
  const rounds = envInt('BENCH_ROUNDS', 3);
  const size = sizeMiB * MiB;
  const log = (s: string) => process.stderr.write(s + '\n');
  const say = (s: string) => (json ? process.stderr : process.stdout).write(s + '\n');

  haveTime = existsSync('/usr/bin/time');
  const parts = (process.env.BENCH_PARTS ?? 'steps,nbd,convert,probe,locality').split(',').map((t) => t.trim());
  const wanted = (process.env.BENCH_TOOLS ?? 'vhdvault,borg,restic').split(',').map((t) => t.trim());
  const skipped: Array<{ tool: string; reason: string }> = [];
  const tools: Tool[] = [];
  for (const t of TOOLS) {
    if (!wanted.includes(t.name)) continue;
    const missing = t.needs.filter((c) => !which(c));
    if (missing.length) skipped.push({ tool: t.name, reason: `${missing.join(', ')} not found on PATH` });
    else tools.push(t);
  }
  const haveQemu = ['qemu-img', 'qemu-nbd', 'qemu-io'].filter((c) => !which(c));
  const nbdRow = tools.some((t) => t.name === 'vhdvault') && haveQemu.length === 0;
  const [stepRows, nbdDelta, convertRow] = [parts.includes('steps'), nbdRow && parts.includes('nbd'), nbdRow && parts.includes('convert')];
  if (!nbdRow && tools.some((t) => t.name === 'vhdvault')) skipped.push({ tool: 'vhdvault NBD dirty bitmap, qemu-img convert', reason: `${haveQemu.join(', ')} not found on PATH` });
  if (!haveTime) skipped.push({ tool: 'peak memory', reason: '/usr/bin/time (GNU time) not found' });
  const haveStrace = which('strace') && parts.includes('probe');
  if (!haveStrace) skipped.push({ tool: 'durability probe', reason: 'strace not found on PATH' });
  for (const s of skipped) log(`bench: skipping ${s.tool}: ${s.reason}`);

  const work = await mkdtemp(join(process.env.BENCH_DIR || tmpdir(), 'vhdvault-bench-peers-'));
  const servers: ChildProcess[] = [];
  const cleanup = async () => {
    for (const server of servers.splice(0)) await stopServer(server);
    await rm(work, { recursive: true, force: true });
  };
  const onSignal = () => void cleanup().finally(() => process.exit(130));
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  try {
    const loadBefore = loadavg().map((l) => l.toFixed(2)).join(' ');
    const filesystem = await describeFilesystem(work);
    const versions: Record<string, string> = {};
    for (const t of tools) versions[t.name] = await t.version();
    if (nbdRow) versions['qemu-img'] = (await mustRun('qemu-img', ['--version'])).stdout.split('\n')[0]!.trim();

    const durability = haveStrace ? await durabilityProbe(tools, work) : [];

    const p: Paths = { work, base: join(work, 'base.raw'), disk: join(work, 'src', 'disk.raw'), timeFile: join(work, 'time.txt') };
    await mkdir(join(work, 'src'));
    log(`bench: writing the ${sizeMiB} MiB seeded disk ...`);
    const writes = await makeDisk(p.base, size);
    const allocated = Number((await mustRun('du', ['-B1', p.base])).stdout.split(/\s/)[0]);

    // The NBD source for vhdvault's bitmap delta: a qcow2 copy of the disk with a
    // persistent bitmap, the same writes replayed by qemu-io, exported read-only.
    let nbdUri = '';
    if (nbdDelta) {
      log('bench: making the qcow2 image with a dirty bitmap for the NBD delta ...');
      const exported = await bitmapExport(work, 'nbd', p.base, writes);
      servers.push(exported.server);
      nbdUri = exported.uri;
    }

    // The VHD for the conversion comparison.
    const vhd = join(work, 'disk.vhd');
    const converted = join(work, 'converted.raw');
    if (convertRow) await mustRun(process.execPath, [CLI, 'vhd', 'convert', p.base, vhd]);

    const samples = new Map<string, Sample[]>();
    const convertSamples = new Map<string, Sample[]>();
    for (let r = 0; r < rounds; r++) {
      const order = tools.map((_, i) => tools[(i + r) % tools.length]!);
      if (stepRows) for (const tool of order) await roundOf(tool, p, writes, samples, log, r + 1);
      if (nbdDelta) {
        // vhdvault only: a full from the file, then the delta from the bitmap (timed).
        const repo = join(work, 'nbd-repo');
        try {
          await mustRun(process.execPath, [CLI, 'init', repo, '--layout', 'dir', '--compression', 'none']);
          await mustRun(process.execPath, [CLI, 'backup', repo, 'disk', '--source', p.base]);
          const before = await du(repo);
          await mustRun('sync', []);
          const m = await runOne(node(['backup', repo, 'disk', '--source', nbdUri, '--bitmap', 'delta', '--json']), {}, p.timeFile);
          const syncSeconds = await timedSync();
          const after = await du(repo);
          const bytesRead = (JSON.parse(m.stdout) as { bytesRead: number }).bytesRead;
          (samples.get('nbd') ?? samples.set('nbd', []).get('nbd')!).push({ seconds: m.seconds, syncSeconds, peakKiB: m.peakKiB, repoBytes: after, cacheBytes: 0, bytesRead });
          (samples.get('nbd-added') ?? samples.set('nbd-added', []).get('nbd-added')!).push({ seconds: 0, syncSeconds: 0, peakKiB: null, repoBytes: after - before, cacheBytes: 0 });
          log(`bench: round ${r + 1}  vhdvault delta from the NBD dirty bitmap ${m.seconds.toFixed(2)} s, ${(bytesRead / MiB).toFixed(1)} MiB read`);
        } finally {
          await rm(repo, { recursive: true, force: true });
        }
      }
      if (convertRow) {
        // Conversion VHD → raw, both synced, alternating which goes first.
        const ways: Array<[string, () => Promise<Measured>]> = [
          ['vhdvault vhd convert', () => runOne(node(['vhd', 'convert', vhd, converted]), {}, p.timeFile)],
          [
            'qemu-img convert + fsync',
            async () => {
              const m = await runOne({ cmd: 'qemu-img', args: ['convert', '-f', 'vpc', '-O', 'raw', vhd, converted] }, {}, p.timeFile);
              const start = process.hrtime.bigint();
              await fsyncFile(converted);
              return { ...m, seconds: m.seconds + Number(process.hrtime.bigint() - start) / 1e9 };
            },
          ],
        ];
        for (const [name, run] of r % 2 === 0 ? ways : [...ways].reverse()) {
          await rm(converted, { force: true });
          await mustRun('sync', []);
          const m = await run();
          const syncSeconds = await timedSync();
          if (r === 0 && !(await sameContent(converted, p.base))) throw new Error(`${name}: the converted disk differs from the disk`);
          (convertSamples.get(name) ?? convertSamples.set(name, []).get(name)!).push({ seconds: m.seconds, syncSeconds, peakKiB: m.peakKiB, repoBytes: 0, cacheBytes: 0 });
          log(`bench: round ${r + 1}  ${name} ${m.seconds.toFixed(2)} s`);
        }
        await rm(converted, { force: true });
      }
    }

    const locality = tools.some((t) => t.name === 'vhdvault') && parts.includes('locality') ? await localityStudy(p, size, nbdRow, servers, log) : [];

    // The rows: each tool's steps, then "bytes the delta added" (delta minus full, per round).
    const rows: Row[] = [];
    for (const tool of tools) {
      for (const step of STEPS) {
        const s = samples.get(`${tool.name}\0${step}`);
        if (s) rows.push(summarize(tool.name, step, s));
      }
    }
    const deltaAdded: Record<string, number> = {};
    for (const tool of stepRows ? tools : []) {
      const full = samples.get(`${tool.name}\0full`)!;
      const delta = samples.get(`${tool.name}\0delta`)!;
      deltaAdded[tool.name] = Math.round(median(delta.map((d, i) => d.repoBytes - full[i]!.repoBytes)));
    }
    const ratioed = withRatios(rows);
    const nbd = samples.get('nbd');
    const fileDelta = ratioed.find((r) => r.tool === 'vhdvault' && r.step === 'delta');
    const nbdResult = nbd
      ? {
          ...summarize('vhdvault', 'delta from NBD dirty bitmap', nbd),
          bytesAdded: Math.round(median(samples.get('nbd-added')!.map((x) => x.repoBytes))),
          fileDeltaBytesRead: fileDelta?.bytesRead ?? null,
          secondsVsFileDelta: fileDelta ? round3(median(nbd.map((x) => x.seconds)) / fileDelta.seconds) : null,
        }
      : null;
    const convertRows = [...convertSamples].map(([name, s]) => summarize(name, 'VHD → raw, synced', s));
    const ourConvert = convertRows.find((r) => r.tool.startsWith('vhdvault'));
    for (const r of convertRows) r.secondsVsVhdvault = ourConvert ? round3(r.seconds / ourConvert.seconds) : null;

    const results = {
      sizeMiB,
      rounds,
      disk: { seed: DISK_SEED, dataShare: DATA_SHARE, holeShare: round3(1 - DATA_SHARE), allocatedBytes: allocated },
      delta: { seed: WRITES_SEED, writeSize: WRITE_SIZE, writes: writes.length, bytes: writes.length * WRITE_SIZE, share: DELTA_SHARE },
      versions,
      settings: Object.fromEntries(tools.map((t) => [t.name, t.settings])),
      skipped,
      rows: ratioed,
      deltaAddedBytes: deltaAdded,
      nbdBitmapDelta: nbdResult,
      locality,
      convert: convertRows,
      durability: { documented: Object.fromEntries(tools.map((t) => [t.name, DURABILITY_DOCS[t.name]])), probeMiB: PROBE_MIB, syncCalls: durability },
      filesystem,
      load: { before: loadBefore, after: loadavg().map((l) => l.toFixed(2)).join(' ') },
    };
    await writeResults('peers', { sizeMiB, rounds, filesystem }, results, { format: FORMAT, machine: { load: results.load } });

    if (json) return void process.stdout.write(JSON.stringify(results, null, 2) + '\n');
    say(`vhdvault against borg and restic — ${sizeMiB} MiB disk (${DATA_SHARE * 100}% seeded data, the rest holes), delta: ${writes.length} scattered 4 KiB writes; median of ${rounds} (interleaved); ${filesystem}; load ${loadBefore}`);
    say(`versions: ${Object.values(versions).join('; ')}`);
    const mib = (b: number) => (b / MiB).toFixed(1);
    say(
      '\n' +
        formatTable(
          ['tool', 'step', 'median s', 'min–max s', 'then sync s', '× vhdvault', 'peak MiB', 'repo MiB', 'cache MiB'],
          ratioed.map((r) => [r.tool, r.step, r.seconds.toFixed(2), `${r.secondsRange[0].toFixed(2)}–${r.secondsRange[1].toFixed(2)}`, r.syncSeconds.toFixed(2), r.secondsVsVhdvault === null ? '—' : `${r.secondsVsVhdvault.toFixed(2)}×`, r.peakRssMiB === null ? '—' : r.peakRssMiB.toFixed(0), mib(r.repoBytes), mib(r.cacheBytes)]),
        ),
    );
    say(`\nbytes the delta added: ${Object.entries(deltaAdded).map(([t, b]) => `${t} ${mib(b)} MiB`).join(', ')}`);
    if (nbdResult)
      say(`vhdvault delta from the NBD dirty bitmap: ${nbdResult.seconds.toFixed(2)} s (${nbdResult.secondsVsFileDelta}× the file delta), read ${mib(nbdResult.bytesRead ?? 0)} MiB against ${mib(nbdResult.fileDeltaBytesRead ?? 0)} MiB from the file, added ${mib(nbdResult.bytesAdded)} MiB`);
    for (const l of locality)
      say(`locality, ${l.writes} writes of ${l.writeSize / 1024} KiB: ${l.blocksTouched} of ${l.blocks} blocks touched; from the file read ${mib(l.fileDelta.bytesRead)} MiB, added ${mib(l.fileDelta.bytesAdded)} MiB${l.bitmapDelta ? `; from the bitmap read ${mib(l.bitmapDelta.bytesRead)} MiB, added ${mib(l.bitmapDelta.bytesAdded)} MiB` : ''}`);
    for (const r of convertRows) say(`${r.tool}: ${r.seconds.toFixed(2)} s (${r.secondsRange.join('–')}), peak ${r.peakRssMiB ?? '—'} MiB`);
    if (durability.length) {
      say('\nsync calls per step (strace -f -c, 16 MiB disk):');
      say(formatTable(['tool', 'step', ...SYNC_CALLS], durability.map((d) => [d.tool, d.step, ...SYNC_CALLS.map((c) => String(d.calls[c] ?? 0))])));
    }
  } finally {
    await cleanup();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

main().catch((err: unknown) => {
  console.error(err instanceof Error ? (err.stack ?? err.message) : err);
  process.exitCode = 1;
});
