import { execFileSync, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { type FileHandle, mkdtemp, open, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll } from 'vitest';

const temporary: string[] = [];
// Registered when a test file imports this module (while vitest collects the file), so it applies to the
// whole file wherever tempDir() is called: an afterAll called from inside a hook or a test is never run.
afterAll(async () => {
  await Promise.all(temporary.splice(0).map((dir) => rm(dir, { recursive: true, force: true })));
});

/** A fresh temporary directory, removed after the test file (passed or failed), wherever it is called. */
export async function tempDir(prefix = 'vhdvault-test-'): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  temporary.push(dir);
  return dir;
}

/** A sparse raw image of `size` bytes with random data at the given (offset, length) extents. */
export async function makeRaw(path: string, size: number, extents: Array<[number, number]>): Promise<void> {
  const fh = await open(path, 'w');
  try {
    await fh.truncate(size);
    for (const [offset, length] of extents) await fh.write(randomBytes(length), 0, length, offset);
  } finally {
    await fh.close();
  }
}

/** SHA-256 of a file, streamed. */
export async function sha256(path: string): Promise<string> {
  const hash = createHash('sha256');
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.allocUnsafe(4 * 1024 * 1024);
    for (;;) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, null);
      if (bytesRead === 0) break;
      hash.update(buf.subarray(0, bytesRead));
    }
  } finally {
    await fh.close();
  }
  return hash.digest('hex');
}

/** Large sector-aligned files are compared by `qemu-img compare`, which skips the holes of sparse images instead of reading them. */
const BIG = 256 * 1024 * 1024;
let qemuCompare: boolean | undefined;

/**
 * Whether two files hold exactly the same bytes (same length, same content).
 * Small files are read and compared here; large sparse images, when qemu-img is
 * installed, by `qemu-img compare` on the raw bytes (exact for raw images of the
 * same length, and it does not read through holes, which a plain read or a hash
 * must, at a few seconds per GiB).
 */
export async function sameBytes(a: string, b: string): Promise<boolean> {
  const [sa, sb] = await Promise.all([stat(a), stat(b)]);
  if (!sa.isFile() || !sb.isFile()) throw new Error(`sameBytes compares regular files: ${a}, ${b}`);
  if (sa.size !== sb.size) return false;
  if (sa.size >= BIG && sa.size % 512 === 0) {
    qemuCompare ??= spawnSync('qemu-img', ['--version']).status === 0;
    if (qemuCompare) {
      const r = spawnSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', a, b], { encoding: 'utf8' });
      if (r.status === 0) return true;
      if (r.status === 1) return false;
      throw new Error(`qemu-img compare ${a} ${b} failed (${r.status}): ${r.stderr}`);
    }
  }
  const [fa, fb] = await Promise.all([open(a, 'r'), open(b, 'r')]);
  try {
    const size = 4 * 1024 * 1024;
    const [ba, bb] = [Buffer.allocUnsafe(size), Buffer.allocUnsafe(size)];
    for (let at = 0; at < sa.size; at += size) {
      const n = Math.min(size, sa.size - at);
      await Promise.all([readFully(fa, ba, n, at), readFully(fb, bb, n, at)]);
      if (!ba.subarray(0, n).equals(bb.subarray(0, n))) return false;
    }
    return true;
  } finally {
    await Promise.all([fa.close(), fb.close()]);
  }
}

async function readFully(fh: FileHandle, buf: Buffer, length: number, position: number): Promise<void> {
  for (let done = 0; done < length; ) {
    const { bytesRead } = await fh.read(buf, done, length - done, position + done);
    if (bytesRead === 0) throw new Error(`unexpected end of file at ${position + done}`);
    done += bytesRead;
  }
}

/** A small tmpfs at `path`, so that a full filesystem is real. Needs root (CI is root): false where it cannot be mounted. */
export function mountTmpfs(path: string, size: string): boolean {
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', path], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}
