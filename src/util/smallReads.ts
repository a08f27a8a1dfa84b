import { readSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';

/** Reads up to this size may run inline. */
const INLINE_MAX = 64 * 1024;
/** An inline read slower than this means the data is not in the page cache (or the storage is remote)... */
const SLOW_MS = 2;
/** ...so reads go through the thread pool for this long before inline reads are tried again. */
const BACKOFF_MS = 1000;

let threadPoolUntil = 0;

/**
 * Read small ranges (a served 4 KiB request) synchronously while the storage
 * answers them from the page cache: a thread-pool round trip costs several
 * times the read itself (random 4 KiB reads over NBD: about 11k/s through the
 * pool, 30k/s inline, on the 2-core test machine). One slow read sends every
 * read to the pool for a while, so a cold or remote disk never stalls the
 * event loop for long. Resolves to the bytes read (short only at end of file).
 */
export async function readSmall(fh: FileHandle, buffer: Buffer, position: number): Promise<number> {
  if (buffer.length <= INLINE_MAX && performance.now() >= threadPoolUntil) {
    const started = performance.now();
    const n = readSync(fh.fd, buffer, 0, buffer.length, position);
    if (performance.now() - started > SLOW_MS) threadPoolUntil = performance.now() + BACKOFF_MS;
    return n;
  }
  let done = 0;
  while (done < buffer.length) {
    const { bytesRead } = await fh.read(buffer, done, buffer.length - done, position + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return done;
}
