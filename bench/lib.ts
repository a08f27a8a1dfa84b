/**
 * Small helpers shared by the benchmarks: timing, child processes, page-cache
 * control, machine facts and a plain-text table.
 */
import { spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { open, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

export const MiB = 1024 * 1024;

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
