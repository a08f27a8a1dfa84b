import { close, closeSync, open, openSync, read, readSync } from 'node:fs';
import { type FileHandle, open as openFile } from 'node:fs/promises';
import { promisify } from 'node:util';

/** Reads up to this size may run inline. */
const INLINE_MAX = 64 * 1024;
/** An inline read slower than this may mean the data is not in the page cache (or the storage is remote)... */
const SLOW_MS = 2;
/** ...and this many slow ones among the last 16 say so: then reads go through the thread pool... */
const SLOW_OF_16 = 3;
/** ...for this long before inline reads are tried again. */
const BACKOFF_MS = 1000;

let threadPoolUntil = 0;
/** One bit per recent inline read (newest lowest), set when it was slow. */
let slowHistory = 0;

/** Slow reads among the last 16 inline ones. */
function recentSlow(): number {
  let n = 0;
  for (let bits = slowHistory & 0xffff; bits !== 0; bits &= bits - 1) n++;
  return n;
}

/**
 * Small reads (a served 4 KiB request) run synchronously while the storage
 * answers them from the page cache: a thread-pool round trip costs several
 * times the read itself (random 4 KiB reads over NBD: about 11k/s through the
 * pool, 30k/s inline, on the 2-core test machine). Slow inline reads send
 * every read to the pool for a while, so a cold or remote disk never stalls
 * the event loop for long. One slow read alone does not: on a loaded machine
 * a read from the page cache is now and then slow only because the thread
 * was preempted during it, and one such read used to send a second of reads
 * (thousands) through the pool.
 */
function inline<T>(length: number, work: () => T): { value: T } | null {
  if (length > INLINE_MAX || performance.now() < threadPoolUntil) return null;
  const started = performance.now();
  const value = work();
  const slow = performance.now() - started > SLOW_MS;
  slowHistory = (slowHistory << 1) | (slow ? 1 : 0);
  if (slow && recentSlow() >= SLOW_OF_16) threadPoolUntil = performance.now() + BACKOFF_MS;
  return { value };
}

/** Read into `buffer` at `position` of an open file; resolves to the bytes read (short only at end of file). */
export async function readSmall(fh: FileHandle, buffer: Buffer, position: number): Promise<number> {
  const done = inline(buffer.length, () => readSync(fh.fd, buffer, 0, buffer.length, position));
  if (done) return done.value;
  let n = 0;
  while (n < buffer.length) {
    const { bytesRead } = await fh.read(buffer, n, buffer.length - n, position + n);
    if (bytesRead === 0) break;
    n += bytesRead;
  }
  return n;
}

/**
 * Read into `buffer` from `position` of the file at `path`, opened for this
 * read alone (nothing stays open: the file may be replaced between reads);
 * resolves to the bytes read. Inline while fast: three calls on the event
 * loop's thread instead of three trips through the pool.
 */
export async function readFileRange(path: string, buffer: Buffer, position: number): Promise<number> {
  const done = inline(buffer.length, () => {
    const fd = openSync(path, 'r');
    try {
      return readSync(fd, buffer, 0, buffer.length, position);
    } finally {
      closeSync(fd);
    }
  });
  if (done) return done.value;
  const fh = await openFile(path, 'r');
  try {
    return (await fh.read(buffer, 0, buffer.length, position)).bytesRead;
  } finally {
    await fh.close();
  }
}

const openAsync = promisify(open);
const readAsync = promisify(read);
const closeQuietly = (fd: number) => close(fd, () => undefined);

/**
 * Files read again and again by path (a served backup's block files), kept
 * open between reads: at most `capacity` idle ones, least recently used
 * closed first, never one a read is using. Opening, like reading, runs inline
 * while it is fast.
 */
export class OpenFiles {
  private readonly fds = new Map<string, { fd: number; users: number }>();

  constructor(private readonly capacity: number) {}

  /** Read into `buffer` at `position` of the file at `path`; resolves to the bytes read. */
  async read(path: string, buffer: Buffer, position: number): Promise<number> {
    const done = inline(buffer.length, () => {
      const entry = this.take(path) ?? this.add(path, openSync(path, 'r'));
      try {
        return readSync(entry.fd, buffer, 0, buffer.length, position);
      } finally {
        this.release(entry);
      }
    });
    if (done) return done.value;
    let entry = this.take(path);
    if (!entry) {
      const fd = await openAsync(path, 'r');
      entry = this.take(path); // another read may have opened it meanwhile
      if (entry) closeQuietly(fd);
      else entry = this.add(path, fd);
    }
    try {
      let n = 0;
      while (n < buffer.length) {
        const { bytesRead } = await readAsync(entry.fd, buffer, n, buffer.length - n, position + n);
        if (bytesRead === 0) break;
        n += bytesRead;
      }
      return n;
    } finally {
      this.release(entry);
    }
  }

  /** Close the idle files under `prefix` (their owner is closing). */
  closeUnder(prefix: string): void {
    for (const [path, entry] of this.fds) {
      if (!path.startsWith(prefix) || entry.users > 0) continue;
      this.fds.delete(path);
      closeSync(entry.fd);
    }
  }

  private take(path: string): { fd: number; users: number } | undefined {
    const entry = this.fds.get(path);
    if (!entry) return undefined;
    this.fds.delete(path); // re-inserted last: most recently used
    this.fds.set(path, entry);
    entry.users++;
    return entry;
  }

  private add(path: string, fd: number): { fd: number; users: number } {
    const entry = { fd, users: 1 };
    this.fds.set(path, entry);
    return entry;
  }

  private release(entry: { fd: number; users: number }): void {
    entry.users--;
    for (const [path, e] of this.fds) {
      if (this.fds.size <= this.capacity) return;
      if (e.users > 0) continue;
      this.fds.delete(path);
      closeQuietly(e.fd);
    }
  }
}
