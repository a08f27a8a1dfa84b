import { link, readFile, unlink, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { VhdError } from '../vhd/errors.js';
import { temporaryPath } from '../util/fsync.js';

interface LockOwner {
  pid: number;
  host: string;
  startedAt: string;
  command: string;
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * One writer per disk: `<disk>/lock` holds the owner (pid, host, start). It is
 * created whole (written under a temporary name, then hard-linked into place,
 * which fails if it exists). A lock whose process is gone on this host is stale
 * and taken over.
 */
export class DiskLock {
  private constructor(private readonly path: string) {}

  static async acquire(diskDir: string, command: string): Promise<DiskLock> {
    const path = join(diskDir, 'lock');
    const owner: LockOwner = { pid: process.pid, host: hostname(), startedAt: new Date().toISOString(), command };
    const temp = temporaryPath(path);
    await writeFile(temp, JSON.stringify(owner));
    try {
      for (let attempt = 0; attempt < 2; attempt++) {
        try {
          await link(temp, path);
          return new DiskLock(path);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
        }
        const holder = await readFile(path, 'utf8')
          .then((t) => JSON.parse(t) as LockOwner)
          .catch(() => null);
        if (holder && holder.host === owner.host && !processAlive(holder.pid)) {
          await unlink(path).catch(() => undefined); // stale: its process is gone
          continue;
        }
        const who = holder ? `process ${holder.pid} on ${holder.host} (${holder.command}, since ${holder.startedAt})` : 'another process';
        throw new VhdError(diskDir, `is locked by ${who}; if that process is gone, remove ${path}`);
      }
      throw new VhdError(diskDir, `could not take the lock ${path}`);
    } finally {
      await unlink(temp).catch(() => undefined);
    }
  }

  async release(): Promise<void> {
    await unlink(this.path).catch(() => undefined);
  }
}

/** Run `fn` holding the disk's lock. */
export async function withDiskLock<T>(diskDir: string, command: string, fn: () => Promise<T>): Promise<T> {
  const lock = await DiskLock.acquire(diskDir, command);
  try {
    return await fn();
  } finally {
    await lock.release();
  }
}
