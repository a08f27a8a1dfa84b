import { setTimeout as sleep } from 'node:timers/promises';
import { VaultError } from '../util/errors.js';
import { describeOwner, isOwnerGone, type LockOwner, lockOwner, parseOwner, seenRunning } from '../util/owner.js';
import { isNotFound, key, type Storage } from '../storage/Storage.js';
import type { Repository } from './repository.js';

/** The disk is locked by a process not known to be gone. */
export class LockBusyError extends VaultError {
  constructor(
    where: string,
    message: string,
    readonly holder: LockOwner | null,
  ) {
    super(where, message);
  }
}

/** Our lock is no longer ours (a person ran unlock, thinking us gone): nothing more may be changed. */
export class LockLostError extends VaultError {}

/** A lock file nobody could parse is stale once this old (ours are never seen half-written). */
const UNREADABLE_STALE_MS = 10_000;
/** A takeover marker left by a crash in the middle of a takeover is removed once this old. */
const TAKEOVER_STALE_MS = 10_000;

/**
 * One writer per disk (docs/design/05-writing-safely.md §5.1): `<disk>/lock`
 * holds the owner record. It is created whole with the storage's put-if-absent
 * (a hard link locally; a conditional PUT or claims on S3). Only a lock whose
 * owner is provably gone is stale, never one that is merely old; taking it over
 * is serialized by `lock.takeover` (created exclusively), whose holder re-reads
 * the lock before removing it, so two processes can never both remove one stale
 * lock and both go on. The holder confirms the lock before each change it commits.
 */
export class DiskLock {
  private constructor(
    private readonly storage: Storage,
    private readonly key: string,
    /** Who holds it: the record in the lock, whose token the lock's markers repeat. */
    readonly owner: LockOwner,
    private readonly where: string,
  ) {}

  static acquire(repo: Repository, disk: string, command: string): Promise<DiskLock> {
    return DiskLock.acquireAt(repo.storage, key(repo.diskKey(disk), 'lock'), command, repo.diskDir(disk), (holder) => busy(repo, disk, holder));
  }

  /** The same lock at another key (the keyring's, `keys/lock`): `where` names what it guards in messages. */
  static async acquireAt(storage: Storage, lockKey: string, command: string, where: string, busyError: (holder: LockOwner | null) => VaultError): Promise<DiskLock> {
    const owner = lockOwner(command);
    const text = JSON.stringify(owner);
    // Long enough for a takeover marker left by a killed process to become stale.
    const deadline = Date.now() + TAKEOVER_STALE_MS + 5_000;
    for (let attempt = 0; Date.now() < deadline || attempt < 50; attempt++) {
      // Created whole and durable, and only where no lock is (put-if-absent).
      if (await storage.put(lockKey, text, { ifAbsent: true })) {
        // A takeover a killed process left half done (its marker) would be left forever once nobody needs to take over.
        await removeDeadMarker(storage, `${lockKey}.takeover`, owner);
        return new DiskLock(storage, lockKey, owner, where);
      }
      const seen = await readLock(storage, lockKey);
      if (seen === null) continue; // released meanwhile
      if (!seen.stale(owner)) throw busyError(seen.holder);
      if (!(await takeOver(storage, lockKey, seen.text, owner))) await sleep(20);
    }
    throw new VaultError(where, `could not take the lock ${storage.describe(lockKey)}`);
  }

  /**
   * Throw unless the lock still holds our record: called right before a commit
   * or a deletion, so that a process whose lock was removed (by a person
   * running unlock while it was paused) changes nothing more.
   */
  async confirm(): Promise<void> {
    const seen = await readLock(this.storage, this.key);
    if (seen?.holder?.token === this.owner.token) return;
    const now = seen === null ? 'no lock is there' : seen.holder ? `it is now held by ${describeOwner(seen.holder)}` : 'another lock is there';
    throw new LockLostError(this.where, `lost its lock while this ${this.owner.command} ran (${now}): it stopped before changing anything more`);
  }

  async release(): Promise<void> {
    // Only ours: a lock a person removed and another process took since is that process's.
    await removeIfUnchanged(this.storage, this.key, JSON.stringify(this.owner)).catch(() => undefined);
  }
}

function busy(repo: Repository, disk: string, holder: LockOwner | null): LockBusyError {
  const who = holder ? describeOwner(holder) : 'another process';
  const lockKey = key(repo.diskKey(disk), 'lock');
  return new LockBusyError(repo.diskDir(disk), `is locked by ${who}; if that process is gone, run \`vhdvault unlock ${repo.root} ${disk}\` (it removes ${repo.storage.describe(lockKey)})`, holder);
}

/** The holder of a disk's lock, when it is locked. */
export async function lockHolder(repo: Repository, disk: string): Promise<{ holder: LockOwner | null } | null> {
  const seen = await readLock(repo.storage, key(repo.diskKey(disk), 'lock'));
  return seen && { holder: seen.holder };
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
    await removeDeadMarker(storage, marker, me);
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

/**
 * Remove a takeover marker whose owner is dead (killed mid-takeover) — stale at once — or
 * that nobody can read once old; only if it is still the one judged (another process may
 * have replaced it meanwhile). A live owner's marker stays.
 */
async function removeDeadMarker(storage: Storage, marker: string, me: LockOwner): Promise<void> {
  const seen = await storage.get(marker).then((b) => b.toString('utf8'), () => null);
  if (seen === null) return;
  const info = await storage.head(marker);
  const owner = parseOwner(seen);
  const stale = owner ? isOwnerGone(owner, me) : info !== null && Date.now() - info.mtimeMs > TAKEOVER_STALE_MS;
  if (stale) await removeIfUnchanged(storage, marker, seen);
}

/** Run `fn` holding the disk's lock. */
export async function withDiskLock<T>(repo: Repository, disk: string, command: string, fn: (lock: DiskLock) => Promise<T>): Promise<T> {
  const lock = await DiskLock.acquire(repo, disk, command);
  try {
    return await fn(lock);
  } finally {
    await lock.release();
  }
}

/** The lock's record and its takeover marker's, as `vhdvault unlock` finds them (unlock.ts). */
export async function lockRecords(repo: Repository, disk: string): Promise<{ key: string; text: string; holder: LockOwner | null }[]> {
  const lockKey = key(repo.diskKey(disk), 'lock');
  const found = [];
  for (const k of [lockKey, `${lockKey}.takeover`]) {
    const seen = await readLock(repo.storage, k);
    if (seen) found.push({ key: k, text: seen.text, holder: seen.holder });
  }
  return found;
}

/** Delete `k` only if it still holds `text`: one replaced meanwhile by another process stays. */
export async function removeIfUnchanged(storage: Storage, k: string, text: string): Promise<void> {
  const now = await storage.get(k).then((b) => b.toString('utf8'), () => null);
  if (now === text) await storage.delete(k);
}
