import { randomFillSync } from 'node:crypto';
import { mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { compress, decompress } from '../vhd/compression.js';
import { digestOf } from './digests.js';

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;
/** Each measurement runs at least this long. */
const MIN_MS = 600;

export interface StageSpeed {
  stage: string;
  bytesPerSecond: number;
  note: string;
}

/**
 * A block that compresses roughly like disk data: half words from a small
 * vocabulary (text, code, logs), half random bytes (media, already compressed).
 */
function sampleBlock(): Buffer {
  const words = ['the', 'disk', 'block', 'backup', 'kernel', 'error', 'GET /index.html', 'user', '0000', 'null', 'value', '\n'];
  const b = Buffer.alloc(BLOCK);
  let at = 0;
  let i = 7;
  while (at < BLOCK / 2) {
    i = (i * 1103515245 + 12345) & 0x7fffffff;
    at += b.write(`${words[i % words.length]} `, at);
  }
  randomFillSync(b, BLOCK / 2);
  return b;
}

async function rate(bytesPerRun: number, run: () => Promise<unknown> | unknown): Promise<number> {
  let bytes = 0;
  const start = performance.now();
  do {
    await run();
    bytes += bytesPerRun;
  } while (performance.now() - start < MIN_MS);
  return bytes / ((performance.now() - start) / 1000);
}

async function dropPageCache(): Promise<boolean> {
  return writeFile('/proc/sys/vm/drop_caches', '1\n').then(
    () => true,
    () => false,
  );
}

/**
 * What bounds a backup on this machine: read, digest (SHA-256), compression
 * and decompression (gzip, brotli, as the dir layout stores blocks) and write
 * (one file per block with fsync, as the dir layout writes) speeds. Files go
 * under `dir` (a repository, to measure its storage) or the temp folder.
 */
export async function benchStages(dir?: string): Promise<StageSpeed[]> {
  const work = await mkdtemp(join(dir ?? tmpdir(), '.vhdvault-bench-'));
  try {
    const block = sampleBlock();
    const results: StageSpeed[] = [];
    const blocksToWrite = 48;

    let n = 0;
    const writeRate = await rate(BLOCK, async () => {
      const fh = await open(join(work, `b${n++}`), 'w');
      await fh.writeFile(block);
      await fh.datasync();
      await fh.close();
      if (n >= blocksToWrite) n = 0;
    });
    const dropped = await dropPageCache();
    // One pass over the files just written: from storage when the cache could be dropped.
    const readStart = performance.now();
    for (let i = 0; i < Math.min(n, blocksToWrite) || i === 0; i++) await readFile(join(work, `b${i}`));
    const readRate = (Math.max(1, Math.min(n, blocksToWrite)) * BLOCK) / ((performance.now() - readStart) / 1000);
    results.push({ stage: 'read', bytesPerSecond: readRate, note: dropped ? 'from storage (page cache dropped)' : 'from the page cache (run as root to measure storage)' });
    results.push({ stage: 'digest (sha256)', bytesPerSecond: await rate(BLOCK, () => digestOf(block)), note: 'one thread' });
    for (const codec of ['gzip', 'brotli'] as const) {
      const packed = await compress(codec, block);
      results.push({ stage: `compress (${codec})`, bytesPerSecond: await rate(BLOCK, () => compress(codec, block)), note: `one thread; ratio ${(block.length / packed.length).toFixed(2)} on sample data` });
      results.push({ stage: `decompress (${codec})`, bytesPerSecond: await rate(BLOCK, () => decompress(codec, packed, BLOCK)), note: 'one thread' });
    }
    results.push({ stage: 'write', bytesPerSecond: writeRate, note: '2 MiB files, each fsynced' });
    return results;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

export function formatStages(results: StageSpeed[]): string {
  const width = Math.max(...results.map((r) => r.stage.length));
  return results.map((r) => `${r.stage.padEnd(width)}  ${(r.bytesPerSecond / MiB).toFixed(0).padStart(7)} MiB/s  ${r.note}`).join('\n');
}
