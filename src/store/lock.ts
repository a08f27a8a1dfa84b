import { hostname } from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';
import { VaultError } from '../util/errors.js';
import { randomBytes } from 'node:crypto';
import { bootId, pidNamespace, processAlive, processStart } from '../util/processes.js';
import { isNotFound, key, type Storage } from '../storage/Storage.js';
import type { Repository } from './repository.js';

export interface LockOwner {
  pid: number;
  host: string;
  startedAt: string;
  command: string;
  /** This boot of the host (Linux boot_id): a lock from an earlier boot is stale. */
  bootId?: string;
  /** The owner's start time in clock ticks since boot (/proc/<pid>/stat): tells a reused pid from the owner. */
  processStart?: string;
  /** The owner's PID namespace: its pid says nothing in another one (a container with the same host name). */
  pidNamespace?: string;
  /** Random, one per owner record: no two owners share it, whatever their host and pid. */
  token?: string;
}

/** The disk is locked by a live process. */
export class LockBusyError extends VaultError {}

/** A lock file nobody could parse is stale once this old (ours are never seen half-written). */
const UNREADABLE_STALE_MS = 10_000;
/** A takeover marker left by a crash in the middle of a takeover is removed once this old. */
const TAKEOVER_STALE_MS = 10_000;

/** Who we are, as a lock, marker or reader registration records it. */
export function lockOwner(command: string): LockOwner {
  return {
    pid: process.pid,
    host: hostname(),
    startedAt: new Date().toISOString(),
    command,
    bootId: bootId(),
    processStart: processStart(process.pid),
    pidNamespace: pidNamespace(),
    token: randomBytes(8).toString('hex'),
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
  return `process ${o.pid} on host ${o.host} (${o.command}, since ${o.startedAt})`;
}

/** Is the lock's owner certainly gone? Only provable on the same host. */
export function isOwnerGone(holder: LockOwner, me: LockOwner): boolean {
  if (holder.host !== me.host) return false;
  if (holder.bootId && me.bootId && holder.bootId !== me.bootId) return true;
  // Another PID namespace (a container with this host's name): its pid cannot be looked up from here.
  // (Owner records of earlier versions carry none: they are judged as they always were.)
  if (holder.pidNamespace && me.pidNamespace && holder.pidNamespace !== me.pidNamespace) return false;
  if (!processAlive(holder.pid)) return true;
  // The pid is in use: by the owner, or by a process that reused it.
  const start = holder.processStart ? processStart(holder.pid) : undefined;
  return start !== undefined && start !== holder.processStart;
}

/**
 * One writer per disk: `<disk>/lock` holds the owner (pid, host, boot, process
 * start). It is created whole with the storage's put-if-absent (locally: written
 * and fsynced under a temporary name, then hard-linked into place, which fails
 * if it exists). A lock whose owner is gone
 * is stale; taking it over is serialized by `lock.takeover` (created
 * exclusively), whose holder re-reads the lock before removing it, so two
 * processes can never both remove one stale lock and both go on.
 */
export class DiskLock {
  private constructor(
    private readonly storage: Storage,
    private readonly key: string,
  ) {}

  static async acquire(repo: Repository, disk: string, command: string): Promise<DiskLock> {
    const { storage } = repo;
    const lockKey = key(repo.diskKey(disk), 'lock');
    const owner = lockOwner(command);
    const text = JSON.stringify(owner);
    // Long enough for a takeover marker left by a killed process to become stale.
    const deadline = Date.now() + TAKEOVER_STALE_MS + 5_000;
    for (let attempt = 0; Date.now() < deadline || attempt < 50; attempt++) {
      // Created whole and durable, and only where no lock is (put-if-absent).
      if (await storage.put(lockKey, text, { ifAbsent: true })) return new DiskLock(storage, lockKey);
      const seen = await readLock(storage, lockKey);
      if (seen === null) continue; // released meanwhile
      if (!seen.stale(owner)) {
        const who = seen.holder ? describeOwner(seen.holder) : 'another process';
        throw new LockBusyError(repo.diskDir(disk), `is locked by ${who}; if that process is gone, run \`vhdvault unlock ${repo.root} ${disk}\` (it removes ${storage.describe(lockKey)})`);
      }
      if (!(await takeOver(storage, lockKey, seen.text, owner))) await sleep(20);
    }
    throw new VaultError(repo.diskDir(disk), `could not take the lock ${storage.describe(lockKey)}`);
  }

  async release(): Promise<void> {
    await this.storage.delete(this.key).catch(() => undefined);
  }
}

interface SeenLock {
  text: string;
  holder: LockOwner | null;
  stale(me: LockOwner): boolean;
}

async function readLock(storage: Storage, lockKey: string): Promise<SeenLock | null> {
  let text: string;
  let mtimeMs: number;
  try {
    text = (await storage.get(lockKey)).toString('utf8');
    const info = await storage.head(lockKey);
    if (!info) return null;
    mtimeMs = info.mtimeMs;
  } catch (err) {
    if (isNotFound(err)) return null;
    throw err;
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
async function takeOver(storage: Storage, lockKey: string, staleText: string, me: LockOwner): Promise<boolean> {
  const marker = `${lockKey}.takeover`;
  if (!(await storage.put(marker, JSON.stringify(me), { ifAbsent: true }))) {
    // A marker whose owner is dead (killed mid-takeover) is stale at once; one nobody can read, once old.
    const seen = await storage.get(marker).then((b) => b.toString('utf8'), () => null);
    const info = await storage.head(marker);
    const owner = seen === null ? null : parseOwner(seen);
    const stale = owner ? isOwnerGone(owner, me) : info !== null && Date.now() - info.mtimeMs > TAKEOVER_STALE_MS;
    // Remove it only if it is still the one judged (another process may have replaced it meanwhile).
    if (stale && (await storage.get(marker).then((b) => b.toString('utf8'), () => null)) === seen) await storage.delete(marker);
    return false;
  }
  try {
    // Under the marker nobody else removes the lock; its owner is gone, so it cannot change but by us.
    const now = await storage.get(lockKey).then((b) => b.toString('utf8'), () => null);
    if (now === staleText) await storage.delete(lockKey);
    return true;
  } finally {
    await storage.delete(marker);
  }
}

/** Run `fn` holding the disk's lock. */
export async function withDiskLock<T>(repo: Repository, disk: string, command: string, fn: () => Promise<T>): Promise<T> {
  const lock = await DiskLock.acquire(repo, disk, command);
  try {
    return await fn();
  } finally {
    await lock.release();
  }
}

/** Was this lock's owner seen running, here (same host, boot and PID namespace, same process start)? */
function seenRunning(holder: LockOwner, me: LockOwner): boolean {
  const here = holder.host === me.host && (!holder.bootId || holder.bootId === me.bootId) && (!holder.pidNamespace || holder.pidNamespace === me.pidNamespace);
  if (!here || !processAlive(holder.pid)) return false;
  return !holder.processStart || processStart(holder.pid) === holder.processStart;
}

/**
 * `vhdvault unlock`: remove a disk's lock whose owner a person knows is gone
 * (one on another host, or in another container, is never taken over
 * automatically). Refused while the owner is seen running here. Resolves to
 * the owner the lock named (null when it could not be read).
 */
export async function unlockDisk(repo: Repository, disk: string): Promise<LockOwner | null> {
  const { storage } = repo;
  await repo.requireDisk(disk);
  const lockKey = key(repo.diskKey(disk), 'lock');
  const me = lockOwner('unlock');
  const seen = await readLock(storage, lockKey);
  if (seen === null) throw new VaultError(repo.diskDir(disk), 'is not locked');
  if (seen.holder && seenRunning(seen.holder, me)) {
    throw new VaultError(repo.diskDir(disk), `is locked by ${describeOwner(seen.holder)}, which is running: stop it, or let it finish, rather than unlock`);
  }
  await removeIfUnchanged(storage, lockKey, seen.text);
  // A takeover marker a gone process left would stop every later taker; one a live process holds here is its own.
  const marker = await readLock(storage, `${lockKey}.takeover`);
  if (marker && !(marker.holder && seenRunning(marker.holder, me))) await removeIfUnchanged(storage, `${lockKey}.takeover`, marker.text);
  return seen.holder;
}

/** Delete `k` only if it still holds `text`: one replaced meanwhile by another process stays. */
async function removeIfUnchanged(storage: Storage, k: string, text: string): Promise<void> {
  const now = await storage.get(k).then((b) => b.toString('utf8'), () => null);
  if (now === text) await storage.delete(k);
}
