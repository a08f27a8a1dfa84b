/**
 * Which blocks of a sparse raw file hold data. Node has no lseek(SEEK_DATA /
 * SEEK_HOLE), so reading a 64 GiB file with 9 MiB of data meant copying 64 GiB
 * of zeros out of the kernel. qemu-img, which vhdvault already drives, asks the
 * file system for that map (`qemu-img map`), so we ask qemu-img.
 *
 * The map is advice for speed, never for correctness of what is read: a block
 * it calls a hole is one the file system says reads as zeros. Whenever the map
 * cannot be had (no qemu-img, an error, an odd line), every block is read.
 */
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';

/** A line longer than this is not an extent of `qemu-img map --output=json`. */
const MAX_LINE = 4096;

interface Extent {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

/**
 * One flag a block of a file of `size` bytes, set when any byte of the block
 * may hold data; null when the map is not known (then read every block).
 * Blocks the map does not cover stay set: only a hole the file system named is
 * skipped.
 */
export async function dataBlocks(path: string, size: number, blockSize: number): Promise<Uint8Array | null> {
  const blocks = Math.ceil(size / blockSize);
  const flags = new Uint8Array(blocks).fill(1);
  try {
    await eachExtent(path, (e) => {
      if (e.data || !e.zero) return;
      // Whole blocks inside the hole; the last block ends at the file's end (past it reads as zeros).
      const end = e.start + e.length;
      for (let b = Math.ceil(e.start / blockSize); b < blocks && Math.min((b + 1) * blockSize, size) <= end; b++) flags[b] = 0;
    });
  } catch {
    return null;
  }
  return flags;
}

/** Runs `qemu-img map` on the file and hands each extent over as its line arrives (memory stays one line). */
function eachExtent(path: string, onExtent: (e: Extent) => void): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn('qemu-img', ['map', '--output=json', '-f', 'raw', path], { stdio: ['ignore', 'pipe', 'ignore'] });
    let failure: Error | null = null;
    const fail = (err: Error): void => {
      if (failure) return;
      failure = err;
      child.kill();
    };
    child.on('error', fail);
    const lines = createInterface({ input: child.stdout, crlfDelay: Infinity });
    lines.on('line', (line) => {
      if (failure || /^[\s[\]]*$/.test(line)) return;
      const e = line.length > MAX_LINE ? null : parseExtent(line);
      if (e === null) fail(new Error(`unexpected line from qemu-img map: ${line.slice(0, 80)}`));
      else onExtent(e);
    });
    child.on('close', (code) => {
      if (failure) reject(failure);
      else if (code !== 0) reject(new Error(`qemu-img map exited with ${code}`));
      else resolve();
    });
  });
}

/** `[{ "start": …, "length": …, …, "zero": …, "data": … },` and its neighbours without the brackets or comma. */
function parseExtent(line: string): Extent | null {
  const body = line.trim().replace(/^\[/, '').replace(/[,\]]+$/, '');
  let v: unknown;
  try {
    v = JSON.parse(body);
  } catch {
    return null;
  }
  if (typeof v !== 'object' || v === null) return null;
  const { start, length, data, zero } = v as Record<string, unknown>;
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(length) || typeof data !== 'boolean' || typeof zero !== 'boolean') return null;
  return { start: start as number, length: length as number, data, zero };
}
