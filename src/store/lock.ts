import { readFileSync } from 'node:fs';
import { link, open, readFile, stat, unlink } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { VhdError } from '../vhd/errors.js';
import { temporaryPath } from '../util/fsync.js';

export interface LockOwner {
  pid: number;
  host: string;
  startedAt: string;
  command: string;
  /** This boot of the host (Linux boot_id): a lock from an earlier boot is stale. */
  bootId?: string;
  /** The owner's start time in clock ticks since boot (/proc/<pid>/stat): tells a reused pid from the owner. */
  processStart?: string;
}

/** The disk is locked by a live process. */
export class LockBusyError extends VhdError {}

/** A lock file nobody could parse is stale once this old (ours are never seen half-written). */
const UNREADABLE_STALE_MS = 10_000;
/** A takeover marker left by a crash in the middle of a takeover is removed once this old. */
const TAKEOVER_STALE_MS = 10_000;

function bootId(): string | undefined {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return undefined;
  }
}

/** Field 22 of /proc/<pid>/stat (after the parenthesised command name, which may hold spaces). */
function processStart(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Who we are, as a lock, marker or reader registration records it. */
export function lockOwner(command: string): LockOwner {
  return {
    pid: process.pid,
    host: hostname(),
    startedAt: new Date().toISOString(),
    command,
    bootId: bootId(),
    processStart: processStart(process.pid),
  };
}

/** An owner record, or null when the text is not one. */
export function parseOwner(text: string): LockOwner | null {
  try {
    const v = JSON.parse(text) as LockOwner;
    return v !== null && Number.isSafeInteger(v.pid) && typeof v.host === 'string' ? v : null;
  } catch {
    return null;
  }
}

export function describeOwner(o: LockOwner): string {
  return `process ${o.pid} on ${o.host} (${o.command}, since ${o.startedAt})`;
}

/** Is the lock's owner certainly gone? Only provable on the same host. */
export function isOwnerGone(holder: LockOwner, me: LockOwner): boolean {
  if (holder.host !== me.host) return false;
  if (holder.bootId && me.bootId && holder.bootId !== me.bootId) return true;
  if (!processAlive(holder.pid)) return true;
  // The pid is in use: by the owner, or by a process that reused it.
  const start = holder.processStart ? processStart(holder.pid) : undefined;
  return start !== undefined && start !== holder.processStart;
}

/**
 * One writer per disk: `<disk>/lock` holds the owner (pid, host, boot, process
 * start). It is created whole: written and fsynced under a temporary name, then
 * hard-linked into place, which fails if it exists. A lock whose owner is gone
 * is stale; taking it over is serialized by `lock.takeover` (created
 * exclusively), whose holder re-reads the lock before removing it, so two
 * processes can never both remove one stale lock and both go on.
 */
export class DiskLock {
  private constructor(private readonly path: string) {}

  static async acquire(diskDir: string, command: string): Promise<DiskLock> {
    const path = join(diskDir, 'lock');
    const owner = lockOwner(command);
    const temp = temporaryPath(path);
    try {
      const fh = await open(temp, 'wx');
      try {
        await fh.writeFile(JSON.stringify(owner));
        await fh.sync();
      } finally {
        await fh.close();
      }
      for (let attempt = 0; attempt < 50; attempt++) {
        try {
          await link(temp, path);
          return new DiskLock(path);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
        }
        const seen = await readLock(path);
        if (seen === null) continue; // released meanwhile
        if (!seen.stale(owner)) {
          const who = seen.holder ? describeOwner(seen.holder) : 'another process';
          throw new LockBusyError(diskDir, `is locked by ${who}; if that process is gone, remove ${path}`);
        }
        if (!(await takeOver(path, seen.text, owner))) await sleep(20);
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

interface SeenLock {
  text: string;
  holder: LockOwner | null;
  stale(me: LockOwner): boolean;
}

async function readLock(path: string): Promise<SeenLock | null> {
  let text: string;
  let mtimeMs: number;
  try {
    text = await readFile(path, 'utf8');
    mtimeMs = (await stat(path)).mtimeMs;
  } catch {
    return null;
  }
  // An unreadable lock is stale once old enough.
  const holder = parseOwner(text);
  return {
    text,
    holder,
    stale: (me) => (holder ? isOwnerGone(holder, me) : Date.now() - mtimeMs > UNREADABLE_STALE_MS),
  };
}

/**
 * Remove the stale lock whose content was `staleText`, if it is still that one.
 * Returns false when another process is taking over (try again shortly).
 */
async function takeOver(path: string, staleText: string, me: LockOwner): Promise<boolean> {
  const marker = `${path}.takeover`;
  let fh;
  try {
    fh = await open(marker, 'wx');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    const age = await stat(marker).then((s) => Date.now() - s.mtimeMs).catch(() => 0);
    if (age > TAKEOVER_STALE_MS) await unlink(marker).catch(() => undefined);
    return false;
  }
  try {
    await fh.writeFile(JSON.stringify(me));
    await fh.close();
    // Under the marker nobody else removes the lock; its owner is gone, so it cannot change but by us.
    const now = await readFile(path, 'utf8').catch(() => null);
    if (now === staleText) await unlink(path);
    return true;
  } finally {
    await unlink(marker).catch(() => undefined);
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
