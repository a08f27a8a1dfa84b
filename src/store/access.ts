import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { key, type Storage, type StorageError } from '../storage/Storage.js';
import { checkDiskName, inUseByAnother, isTemporaryName } from './names.js';
import { describeOwner, isOwnerGone, type LockOwner, lockOwner, parseOwner } from './lock.js';
import type { Repository } from './repository.js';

/**
 * Readers and destructive writers of one disk, kept apart (docs/design/05-writing-safely.md §5.6).
 *
 * A reader (restore, verify, list) registers a file in `access/<disk>/`, then
 * looks for the `exclusive` marker there; a writer about to change committed
 * data (a merge, a deletion) writes the marker, then waits until no reader is
 * registered. Each side writes before it looks, so whichever comes second sees
 * the other: a reader never runs beside a destructive change, and a writer never
 * starts one under a reader. Registrations and markers of dead processes are
 * ignored (and a writer removes dead readers' files: they are its own kind).
 */

const ACCESS_DIR = 'access';
const MARKER = 'exclusive';
const POLL_MS = 50;

function accessKey(disk: string): string {
  return key(ACCESS_DIR, checkDiskName(disk));
}

async function readOwner(storage: Storage, k: string): Promise<LockOwner | null> {
  const bytes = await storage.get(k).catch(() => null);
  return bytes === null ? null : parseOwner(bytes.toString('utf8'));
}

/** Register as a reader; false where the repository cannot be written (a read-only copy has no writers to fear). */
async function register(storage: Storage, k: string, owner: LockOwner): Promise<boolean> {
  try {
    // A put is whole or absent: nobody ever reads a registration half-written.
    await storage.put(k, JSON.stringify(owner));
    return true;
  } catch (err) {
    const code = (err as StorageError).code;
    // No writer can run on a read-only copy. On a full filesystem a prune can (it gives back
    // the reserve), but a restore is what is needed most then: it reads unregistered, and its
    // digest check still turns any block a merge moved away under it into an error, never wrong data.
    if (code === 'EROFS' || code === 'EACCES' || code === 'EPERM' || code === 'ENOSPC' || code === 'EDQUOT') return false;
    throw err;
  }
}

export interface AccessOptions {
  /** Told once when the other side keeps us waiting. */
  onWait?: (message: string) => void;
  /**
   * A change a dead writer left half done (a merge journal): `pending` looks for
   * it while we are registered and no writer is live; `settle` (run unregistered)
   * finishes it or waits for whoever will.
   */
  recover?: { pending(): Promise<boolean>; settle(): Promise<void> };
}

/**
 * Run `fn` as a reader of `disk`: never beside a merge or deletion. Waits for
 * one in progress to finish, and has an abandoned one finished first.
 */
export async function withReadAccess<T>(repo: Repository, disk: string, command: string, fn: () => Promise<T>, options: AccessOptions = {}): Promise<T> {
  const { storage } = repo;
  const dir = accessKey(disk);
  const me = lockOwner(command);
  const mine = key(dir, `reader-${process.pid}-${randomBytes(4).toString('hex')}`);
  const withdraw = () => storage.delete(mine).catch(() => undefined);
  let told = false;
  for (;;) {
    const registered = await register(storage, mine, me);
    const writer = await readOwner(storage, key(dir, MARKER));
    if (writer && !isOwnerGone(writer, me)) {
      if (registered) await withdraw();
      if (!told) options.onWait?.(`waiting for ${describeOwner(writer)} to finish changing ${disk}`);
      told = true;
      await sleep(POLL_MS);
      continue;
    }
    if (options.recover && (await options.recover.pending())) {
      if (registered) await withdraw();
      await options.recover.settle();
      continue;
    }
    try {
      return await fn();
    } finally {
      if (registered) await withdraw();
    }
  }
}

/**
 * Run `fn` (which changes committed data of `disk`) once no reader is left;
 * readers arriving meanwhile wait. Call with the disk's lock held.
 */
export async function withExclusiveAccess<T>(repo: Repository, disk: string, command: string, fn: () => Promise<T>, options: AccessOptions = {}): Promise<T> {
  const { storage } = repo;
  const dir = accessKey(disk);
  const me = lockOwner(command);
  const marker = key(dir, MARKER);
  await storage.put(marker, JSON.stringify(me));
  try {
    let told = false;
    for (;;) {
      const live: LockOwner[] = [];
      for (const name of await storage.list(dir)) {
        // A registration a killed process was still writing.
        if (isTemporaryName(name) && !inUseByAnother(name)) await storage.delete(key(dir, name));
        if (!name.startsWith('reader-')) continue;
        const owner = await readOwner(storage, key(dir, name));
        if (owner === null) continue; // withdrawn meanwhile (registrations appear whole)
        if (isOwnerGone(owner, me)) await storage.delete(key(dir, name));
        else live.push(owner);
      }
      if (live.length === 0) break;
      if (!told) options.onWait?.(`waiting for ${live.length === 1 ? describeOwner(live[0]!) : `${live.length} readers`} to finish reading ${disk}`);
      told = true;
      await sleep(POLL_MS);
    }
    return await fn();
  } finally {
    await storage.delete(marker);
  }
}
