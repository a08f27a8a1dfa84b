import { randomFillSync } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { type FileHandle, mkdtemp, open, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { compress, decompress } from '../../src/vhd/compression.js';
import { SHA256_DIGESTER } from '../../src/store/digests.js';

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

/** Drops every file's cached pages on the whole machine (root only): only on --drop-caches. */
async function dropPageCache(): Promise<boolean> {
  return writeFile('/proc/sys/vm/drop_caches', '1\n').then(
    () => true,
    () => false,
  );
}

/** One pass over the files with ordinary (page-cached) reads; bytes per second. */
async function cachedRead(files: string[]): Promise<number> {
  const start = performance.now();
  for (const file of files) await readFile(file);
  return (files.length * BLOCK) / ((performance.now() - start) / 1000);
}

/** Largest memory alignment O_DIRECT may need (a 4096-byte logical block). */
const ALIGN_MAX = 4096;

/**
 * Where in `buffer` an O_DIRECT read is accepted: the kernel wants memory aligned
 * to the device's block size, and Node cannot ask for aligned memory, so the
 * offsets are tried in turn (a misaligned read fails at once with EINVAL).
 */
async function alignedOffset(fh: FileHandle, buffer: Buffer): Promise<number | null> {
  for (let offset = 0; offset < ALIGN_MAX; offset += 8) {
    try {
      await fh.read(buffer, offset, ALIGN_MAX, 0);
      return offset;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EINVAL') throw err;
    }
  }
  return null;
}

/**
 * One pass over the files with O_DIRECT, which bypasses the page cache for these
 * files alone (nothing global changes); bytes per second, or null where O_DIRECT
 * is not available (not Linux, tmpfs and some other filesystems).
 */
async function directRead(files: string[]): Promise<number | null> {
  const direct = fsConstants.O_DIRECT;
  if (direct === undefined) return null;
  const buffer = Buffer.allocUnsafeSlow(BLOCK + ALIGN_MAX);
  const handles: FileHandle[] = [];
  try {
    for (const file of files) handles.push(await open(file, fsConstants.O_RDONLY | direct));
    const offset = await alignedOffset(handles[0]!, buffer);
    if (offset === null) return null;
    const start = performance.now();
    for (const fh of handles) {
      for (let done = 0; done < BLOCK; ) {
        const { bytesRead } = await fh.read(buffer, offset + done, BLOCK - done, done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
    }
    return (files.length * BLOCK) / ((performance.now() - start) / 1000);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EINVAL') return null; // O_DIRECT refused by the filesystem
    throw err;
  } finally {
    await Promise.all(handles.map((fh) => fh.close()));
  }
}

/**
 * The read stage over freshly written (and fsynced) files, so still in the page
 * cache: read with O_DIRECT; or, with `dropCaches`, after dropping the machine's
 * page cache; or, where neither works, from the cache, and the note says so.
 */
async function measureRead(files: string[], dropCaches: boolean): Promise<StageSpeed> {
  const stage = 'read';
  if (dropCaches && (await dropPageCache())) return { stage, bytesPerSecond: await cachedRead(files), note: 'from storage (page cache dropped, --drop-caches)' };
  const why = dropCaches ? 'could not drop the page cache (needs root); ' : '';
  const direct = await directRead(files);
  if (direct !== null) return { stage, bytesPerSecond: direct, note: `${why}from storage (O_DIRECT, one 2 MiB read at a time)` };
  return { stage, bytesPerSecond: await cachedRead(files), note: `${why}may be from the page cache (O_DIRECT not supported here; --drop-caches as root measures storage)` };
}

/**
 * What bounds a backup on this machine: read, digest (SHA-256), compression
 * and decompression (gzip, brotli, as the dir layout stores blocks) and write
 * (one file per block with fsync, as the dir layout writes) speeds. Files go
 * under `dir` (a repository, to measure its storage) or the temp folder.
 * The machine's page cache is dropped only with `dropCaches` (see measureRead).
 */
export async function benchStages(dir?: string, options: { dropCaches?: boolean } = {}): Promise<StageSpeed[]> {
  const work = await mkdtemp(join(dir ?? tmpdir(), '.vhdvault-bench-'));
  try {
    const block = sampleBlock();
    const results: StageSpeed[] = [];
    const blocksToWrite = 48;

    let writes = 0;
    const writeRate = await rate(BLOCK, async () => {
      const fh = await open(join(work, `b${writes++ % blocksToWrite}`), 'w');
      await fh.writeFile(block);
      await fh.datasync();
      await fh.close();
    });
    // One pass over the files just written.
    const files = Array.from({ length: Math.min(writes, blocksToWrite) }, (_, i) => join(work, `b${i}`));
    results.push(await measureRead(files, options.dropCaches ?? false));
    results.push({ stage: 'digest (sha256)', bytesPerSecond: await rate(BLOCK, () => SHA256_DIGESTER.of(block)), note: 'one thread' });
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
