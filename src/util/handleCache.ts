import { type FileHandle, open } from 'node:fs/promises';

/**
 * Files kept open between reads (a served backup reads the same block files
 * over and over: opening each time costs two extra system calls per read).
 * At most `capacity` stay open when idle, least recently used closed first;
 * one in use is never closed under its reader.
 */
export class HandleCache {
  private readonly entries = new Map<string, { fh: Promise<FileHandle>; users: number }>();

  constructor(private readonly capacity: number) {}

  async with<T>(path: string, fn: (fh: FileHandle) => Promise<T>): Promise<T> {
    let entry = this.entries.get(path);
    if (entry) this.entries.delete(path); // re-inserted last: most recently used
    else entry = { fh: open(path, 'r'), users: 0 };
    this.entries.set(path, entry);
    entry.users++;
    try {
      return await fn(await entry.fh);
    } catch (err) {
      // A failed open is not kept: the next read tries again.
      if (this.entries.get(path) === entry && !(await entry.fh.then(() => true, () => false))) this.entries.delete(path);
      throw err;
    } finally {
      entry.users--;
      this.evict();
    }
  }

  private evict(): void {
    for (const [path, entry] of this.entries) {
      if (this.entries.size <= this.capacity) return;
      if (entry.users > 0) continue;
      this.entries.delete(path);
      void entry.fh.then((fh) => fh.close()).catch(() => undefined);
    }
  }

  /** Close every idle handle whose path starts with `prefix` (its owner is closing). */
  async closeUnder(prefix: string): Promise<void> {
    const closing: Array<Promise<void>> = [];
    for (const [path, entry] of this.entries) {
      if (!path.startsWith(prefix) || entry.users > 0) continue;
      this.entries.delete(path);
      closing.push(entry.fh.then((fh) => fh.close()).catch(() => undefined));
    }
    await Promise.all(closing);
  }
}
