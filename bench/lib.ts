/**
 * Small helpers shared by the benchmarks: timing, child processes, page-cache
 * control, machine facts, a plain-text table, and writing results for
 * docs/performance.md (writeResults).
 */
import { spawn } from 'node:child_process';
import { createCipheriv, createHash, randomFillSync } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, open, rm, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { availableParallelism, cpus, totalmem } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

export const MiB = 1024 * 1024;

/** Resolves once something accepts connections on the Unix socket `path` (a server just started creates it when ready). */
export async function waitForSocket(path: string, withinMs = 10_000): Promise<void> {
  const deadline = Date.now() + withinMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect(path);
      s.once('connect', () => (s.destroy(), resolve(true)));
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on ${path} after ${withinMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Spawn a command (no shell) and collect its output; never rejects on a non-zero exit. */
export function runCommand(cmd: string, args: string[]): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

/** Spawn a command and fail unless it exits 0. */
export async function mustRun(cmd: string, args: string[]): Promise<RunResult> {
  const r = await runCommand(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.stderr.trim()}`);
  return r;
}

/** Wall-clock seconds taken by `fn`. */
export async function timeIt(fn: () => Promise<unknown>): Promise<number> {
  const start = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - start) / 1e9;
}

export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/** Flush every dirty page to disk so one run's writeback does not bill the next run. */
export async function syncAll(): Promise<void> {
  await mustRun('sync', []);
}

/** fsync one file (what convert does to its output before renaming it). */
export async function fsyncFile(path: string): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Drop clean page cache (root only); returns false when not permitted. */
export async function dropCaches(): Promise<boolean> {
  try {
    await writeFile('/proc/sys/vm/drop_caches', '3\n');
    return true;
  } catch {
    return false;
  }
}

/** Write `bytes` of pseudo-random (never all-zero) data and fsync it. */
export async function writeRandomFile(path: string, bytes: number, chunk = 8 * MiB): Promise<void> {
  const fh = await open(path, 'wx');
  try {
    const buf = Buffer.allocUnsafe(chunk);
    for (let done = 0; done < bytes; ) {
      const n = Math.min(chunk, bytes - done);
      randomFillSync(buf, 0, n);
      await fh.write(buf, 0, n, done);
      done += n;
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** A positive integer from the environment (BENCH_SIZE_MIB, BENCH_ROUNDS), else `fallback`. */
export function envInt(name: string, fallback: number): number {
  const v = process.env[name];
  if (v === undefined || v === '') return fallback;
  const n = Number(v);
  if (!Number.isInteger(n) || n <= 0) throw new Error(`${name} must be a positive integer, got "${v}"`);
  return n;
}

/** mulberry32: a small seeded generator, uniform in [0, 1); the same seed gives the same numbers. */
export function seededRandom(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = Math.imul(s ^ (s >>> 15), 1 | s);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

/**
 * Seeded pseudo-random bytes at memory speed: the AES-256-CTR keystream under a
 * key derived from `seed` (not secret, only reproducible). Each call returns the
 * stream's next `n` bytes, so the same seed and the same calls give the same data.
 */
export function seededBytes(seed: string | number): (n: number) => Buffer {
  const key = createHash('sha256').update(`vhdvault-bench:${seed}`).digest();
  const stream = createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
  return (n) => stream.update(Buffer.alloc(n));
}

/** What writeSeededDisk wrote: which blocks are all zeros, which hold data. */
export interface SeededDisk {
  size: number;
  blockSize: number;
  zeroBlocks: number[];
  dataBlocks: number[];
}

/**
 * A reproducible disk image: pseudo-random data (seededBytes) with zero regions
 * (runs of 1–8 whole blocks, `zeroShare` of the blocks in all, placed by
 * seededRandom), written and fsynced. The same seed gives the same bytes.
 */
export async function writeSeededDisk(path: string, bytes: number, options: { seed?: number; zeroShare?: number; blockSize?: number } = {}): Promise<SeededDisk> {
  const { seed = 1, zeroShare = 0.1, blockSize = 2 * MiB } = options;
  const blocks = Math.ceil(bytes / blockSize);
  const random = seededRandom(seed);
  const zero = new Uint8Array(blocks);
  const wanted = Math.round(blocks * zeroShare);
  for (let zeros = 0; zeros < wanted; ) {
    const start = Math.floor(random() * blocks);
    const run = 1 + Math.floor(random() * 8);
    for (let b = start; b < Math.min(blocks, start + run) && zeros < wanted; b++) if (!zero[b]) (zero[b] = 1), zeros++;
  }
  const data = seededBytes(seed);
  const fh = await open(path, 'wx');
  try {
    const empty = Buffer.alloc(blockSize);
    for (let b = 0; b < blocks; b++) {
      const n = Math.min(blockSize, bytes - b * blockSize);
      await fh.write(zero[b] ? empty : data(n), 0, n, b * blockSize);
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  const all = [...Array(blocks).keys()];
  return { size: bytes, blockSize, zeroBlocks: all.filter((b) => zero[b]), dataBlocks: all.filter((b) => !zero[b]) };
}

/**
 * Rewrite `share` of a seeded disk's data blocks (chosen by seededRandom(seed),
 * each distinct) whole with new seeded data, and fsync: a reproducible delta.
 * Returns the blocks rewritten, in order.
 */
export async function rewriteSeededBlocks(path: string, disk: SeededDisk, share: number, seed = 2): Promise<number[]> {
  const random = seededRandom(seed);
  const pool = [...disk.dataBlocks];
  const count = Math.max(1, Math.round(pool.length * share));
  // A partial Fisher–Yates shuffle: the first `count` are the chosen blocks.
  for (let i = 0; i < count; i++) {
    const j = i + Math.floor(random() * (pool.length - i));
    [pool[i], pool[j]] = [pool[j]!, pool[i]!];
  }
  const chosen = pool.slice(0, count).sort((a, b) => a - b);
  const data = seededBytes(`rewrite:${seed}`);
  const fh = await open(path, 'r+');
  try {
    for (const b of chosen) {
      const n = Math.min(disk.blockSize, disk.size - b * disk.blockSize);
      await fh.write(data(n), 0, n, b * disk.blockSize);
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  return chosen;
}

/** One write of seededScatteredWrites: `data` at byte `offset`. */
export interface SeededWrite {
  offset: number;
  data: Buffer;
}

/**
 * `share` of a disk's bytes as distinct `writeSize`-aligned writes at seeded
 * random offsets anywhere on the disk (holes included), each with its own
 * seeded data, sorted by offset: a reproducible scattered delta that any tool
 * can replay (applySeededWrites for a file; qemu-io for an image).
 */
export function seededScatteredWrites(size: number, share: number, options: { seed?: number; writeSize?: number } = {}): SeededWrite[] {
  const { seed = 3, writeSize = 4096 } = options;
  const slots = Math.floor(size / writeSize);
  const count = Math.min(slots, Math.max(1, Math.round((size * share) / writeSize)));
  const random = seededRandom(seed);
  const chosen = new Set<number>();
  while (chosen.size < count) chosen.add(Math.floor(random() * slots));
  const data = seededBytes(`scatter:${seed}`);
  return [...chosen].sort((a, b) => a - b).map((slot) => ({ offset: slot * writeSize, data: data(writeSize) }));
}

/** Write each of `writes` into the file at `path` in place, then fsync it. */
export async function applySeededWrites(path: string, writes: readonly SeededWrite[]): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    for (const w of writes) await fh.write(w.data, 0, w.data.length, w.offset);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** True when the two files have identical bytes. */
export async function sameContent(a: string, b: string, chunk = 8 * MiB): Promise<boolean> {
  const [fa, fb] = await Promise.all([open(a, 'r'), open(b, 'r')]);
  try {
    const [sa, sb] = await Promise.all([fa.stat(), fb.stat()]);
    if (sa.size !== sb.size) return false;
    const ba = Buffer.allocUnsafe(chunk);
    const bb = Buffer.allocUnsafe(chunk);
    for (let at = 0; at < sa.size; at += chunk) {
      const n = Math.min(chunk, sa.size - at);
      await Promise.all([fa.read(ba, 0, n, at), fb.read(bb, 0, n, at)]);
      if (!ba.subarray(0, n).equals(bb.subarray(0, n))) return false;
    }
    return true;
  } finally {
    await Promise.all([fa.close(), fb.close()]);
  }
}

/** "ext4 on /dev/vda" for the filesystem holding `dir`. */
export async function describeFilesystem(dir: string): Promise<string> {
  const r = await runCommand('findmnt', ['-n', '-o', 'FSTYPE,SOURCE', '-T', dir]).catch(() => null);
  if (r && r.code === 0 && r.stdout.trim()) {
    const [type, source] = r.stdout.trim().split(/\s+/);
    return `${type} on ${source}`;
  }
  const s = await runCommand('stat', ['-f', '-c', '%T', dir]).catch(() => null);
  return s && s.code === 0 ? s.stdout.trim() : 'unknown';
}

/**
 * How `cp` copies data on this filesystem, found by tracing it on a small
 * file: reflink (FICLONE), copy_file_range (in-kernel copy), or read/write.
 */
export async function detectCpMechanism(dir: string): Promise<string> {
  const src = join(dir, 'cp-probe.src');
  const dst = join(dir, 'cp-probe.dst');
  try {
    await writeRandomFile(src, 4 * MiB);
    const r = await runCommand('strace', ['-f', '-qq', '-e', 'trace=ioctl,copy_file_range,read,write', 'cp', src, dst]).catch(() => null);
    if (r === null || r.code !== 0) return 'unknown (strace not available)';
    const lines = r.stderr.split('\n');
    const clone = lines.find((l) => /FICLONE/.test(l));
    const cloneOk = clone !== undefined && /=\s*0\s*$/.test(clone);
    const cfr = lines.filter((l) => l.startsWith('copy_file_range') || /\bcopy_file_range\(/.test(l));
    const cfrOk = cfr.some((l) => /=\s*[1-9]\d*\s*$/.test(l));
    const bigWrites = lines.filter((l) => /^(\[pid \d+\] )?write\(4,/.test(l)).length;
    const cloneNote = clone === undefined ? 'no FICLONE attempt' : cloneOk ? 'FICLONE succeeded' : `FICLONE failed: ${clone.replace(/.*=\s*-1\s*/, '')}`;
    if (cloneOk) return `reflink (FICLONE); ${cfr.length ? 'copy_file_range also seen' : 'no data copied'}`;
    if (cfrOk) return `copy_file_range (in-kernel copy, no user-space buffers); ${cloneNote}`;
    if (bigWrites > 0) return `read/write through user space; ${cloneNote}`;
    return `unrecognised (${cloneNote})`;
  } finally {
    await Promise.all([rm(src, { force: true }), rm(dst, { force: true })]);
  }
}

/** A plain-text table with right-aligned numeric columns. */
export function formatTable(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const numeric = headers.map((_, i) => rows.every((r) => /^[-+]?[\d.,×x%/]+$|^—$/.test(r[i] ?? '')));
  const line = (cells: string[]) =>
    cells.map((c, i) => (numeric[i] ? c.padStart(widths[i]!) : c.padEnd(widths[i]!))).join('  ').trimEnd();
  return [line(headers), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n');
}

// ---------------------------------------------------------------- results

/** Where benchmark results are kept, from the repository's root; docs/performance.md is generated from them (bench/report.ts). */
export const RESULTS_DIR = 'bench/results';

/**
 * One benchmark run as stored in bench/results/<name>.json. A stable envelope
 * around each benchmark's own figures (`results`: what its --json prints).
 */
export interface BenchResult {
  /** The benchmark: convert, backup, merge, nbd, live, jobs, s3, … (what bench/report.ts groups by). */
  bench: string;
  /** When it ran: an ISO 8601 date or date and time. */
  date: string;
  /** What results' layout is, when a benchmark versions it (e.g. "vhdvault-bench-crypto/1"). */
  format?: string;
  /** cpus, node and a description always; a benchmark may add facts of its own (e.g. CPU flags). */
  machine: { cpus: number; node: string; description?: string; [fact: string]: unknown };
  /** How to run it again: the npm script, with the BENCH_* variables that were set. */
  command?: string | string[];
  /** The conditions: sizes, rounds, layout, … */
  params?: Record<string, unknown>;
  results: unknown;
  /** Where figures come from when a script did not write them (e.g. "transcribed from …"). */
  source?: string;
  /** Short remarks the report prints under the table. */
  notes?: string[];
}

/** The repository's root: the nearest folder above this file holding package.json (from bench/ or dist/bench/). */
function repoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json'))) {
    const up = dirname(dir);
    if (up === dir) throw new Error('bench: no package.json above bench/lib');
    dir = up;
  }
  return dir;
}

/** The command that ran this benchmark, as a user would type it again: BENCH_* variables, then the npm script (or `run`). */
function commandLine(run?: string): string {
  const vars = Object.entries(process.env)
    .filter(([k, v]) => k.startsWith('BENCH_') && k !== 'BENCH_RESULT_NAME' && k !== 'BENCH_NO_BUILD' && v !== undefined && v !== '')
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([k, v]) => `${k}=${v}`);
  const event = process.env.npm_lifecycle_event;
  const how = run ?? (event ? `npm run ${event}` : `node ${process.argv.slice(1).map((a) => relative(process.cwd(), a) || a).join(' ')}`);
  return [...vars, how].join(' ');
}

/**
 * Write a benchmark's results to bench/results/<name>.json (name: `bench`, or
 * BENCH_RESULT_NAME to keep a variant beside it, e.g. backup-vhd), for
 * `npm run bench:report`. Returns the path written.
 */
export async function writeResults(
  bench: string,
  params: Record<string, unknown>,
  results: unknown,
  options: { name?: string; notes?: string[]; command?: string; format?: string; machine?: Record<string, unknown> } = {},
): Promise<string> {
  const name = process.env.BENCH_RESULT_NAME || options.name || bench;
  if (!/^[\w.-]+$/.test(name)) throw new Error(`bench: "${name}" is not a usable results file name`);
  const record: BenchResult = {
    bench,
    ...(options.format ? { format: options.format } : {}),
    date: new Date().toISOString(),
    machine: { cpus: availableParallelism(), node: process.version, description: `${cpus()[0]?.model.trim() ?? 'unknown CPU'}, ${Math.round(totalmem() / 1024 ** 3)} GiB RAM`, ...options.machine },
    command: commandLine(options.command),
    params,
    results,
    ...(options.notes && options.notes.length > 0 ? { notes: options.notes } : {}),
  };
  const dir = join(repoRoot(), RESULTS_DIR);
  await mkdir(dir, { recursive: true });
  const path = join(dir, `${name}.json`);
  await writeFile(path, JSON.stringify(record, null, 2) + '\n');
  process.stderr.write(`bench: results written to ${relative(process.cwd(), path) || path}\n`);
  return path;
}
