import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { key, type Storage, type StorageError } from '../storage/Storage.js';
import { checkDiskName, inUseByAnother, isTemporaryName } from './names.js';
import { describeOwner, isOwnerGone, type LockOwner, lockOwner, parseOwner, seenRunning } from '../util/owner.js';
import { UsageError, VaultError } from '../util/errors.js';
import { type DiskLock, LockBusyError, lockHolder } from './lock.js';
import type { Repository } from './repository.js';

/**
 * Readers and destructive writers of one disk, kept apart (docs/design/04-repository.md §4.11).
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
  /** Told when another process keeps us waiting: who, where, and how to end the wait (default: stderr). */
  onWait?: (message: string) => void;
  /**
   * A change a dead writer left half done (a merge journal): `pending` looks for
   * it while we are registered and no writer is live; `settle` (run unregistered)
   * finishes it, or throws LockBusyError while another process holds the lock (which finishes it).
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
  const waiting = new Waiting(repo, disk, me, options.onWait);
  for (;;) {
    const registered = await register(storage, mine, me);
    const writer = await liveWriter(repo, disk, me);
    if (writer) {
      if (registered) await withdraw();
      await waiting.on(writer, `to finish changing ${disk}`);
      continue;
    }
    if (options.recover && (await options.recover.pending())) {
      if (registered) await withdraw();
      try {
        await options.recover.settle();
      } catch (err) {
        if (!(err instanceof LockBusyError)) throw err;
        // Whoever holds the lock finishes the merge first thing.
        await waiting.on(err.holder, `to finish the interrupted merge of ${disk} it holds the lock for`);
      }
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
 * The writer whose `exclusive` marker is there and who still holds the disk's
 * lock (the marker repeats the lock's record): a marker whose writer no longer
 * holds the lock, or is seen gone here, keeps nobody waiting.
 */
async function liveWriter(repo: Repository, disk: string, me: LockOwner): Promise<LockOwner | null> {
  const writer = await readOwner(repo.storage, key(accessKey(disk), MARKER));
  if (!writer || isOwnerGone(writer, me)) return null;
  const lock = await lockHolder(repo, disk);
  return lock?.holder?.token === writer.token ? writer : null;
}

/**
 * Run `fn` (which changes committed data of `disk`) once no reader is left;
 * readers arriving meanwhile wait. Call with the disk's lock held.
 */
export async function withExclusiveAccess<T>(repo: Repository, disk: string, lock: DiskLock, fn: () => Promise<T>, options: AccessOptions = {}): Promise<T> {
  const { storage } = repo;
  const dir = accessKey(disk);
  const me = lock.owner;
  const marker = key(dir, MARKER);
  const waiting = new Waiting(repo, disk, me, options.onWait);
  await storage.put(marker, JSON.stringify(me));
  try {
    for (;;) {
      const live = await liveReaders(storage, dir, me);
      if (live.length === 0) break;
      await waiting.on(live[0]!, `to finish reading ${disk}${live.length > 1 ? ` (and ${live.length - 1} more readers)` : ''}`);
    }
    await lock.confirm();
    return await fn();
  } finally {
    await storage.delete(marker);
  }
}

/** The readers registered in `dir` not seen gone; those seen gone (and half-written registrations) are removed. */
async function liveReaders(storage: Storage, dir: string, me: LockOwner): Promise<LockOwner[]> {
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
  return live;
}

/**
 * The registrations and marker of `disk` that `vhdvault unlock` may remove: every
 * one not seen running here (a person vouches that those elsewhere are gone).
 */
export async function abandonedAccess(repo: Repository, disk: string): Promise<{ keys: string[]; owners: LockOwner[] }> {
  const dir = accessKey(disk);
  const me = lockOwner('unlock');
  const found = { keys: [] as string[], owners: [] as LockOwner[] };
  for (const name of await repo.storage.list(dir)) {
    if (name !== MARKER && !name.startsWith('reader-')) continue;
    const owner = await readOwner(repo.storage, key(dir, name));
    if (owner && seenRunning(owner, me)) continue;
    found.keys.push(key(dir, name));
    if (owner) found.owners.push(owner);
  }
  return found;
}

/** How long a wait on a process we cannot see (another host or container) lasts before it is given up: VHDVAULT_WAIT_S, default 600. */
function waitLimitMs(): number {
  const v = process.env.VHDVAULT_WAIT_S;
  const n = v === undefined || v === '' ? 600 : Number(v);
  if (!Number.isFinite(n) || n < 0) throw new UsageError(`VHDVAULT_WAIT_S must be a number of seconds, not "${v}"`);
  return n * 1000;
}

/**
 * Waits on other processes, never silent: each one is named once (who, on which
 * host, how to end the wait). One seen running here is waited for as long as
 * it runs; one we cannot see may be gone, so it is waited for at most
 * VHDVAULT_WAIT_S, then the command fails saying how to release it.
 */
class Waiting {
  private readonly since = new Map<string, number>();
  private polls = 0;
  private readonly tell: (message: string) => void;
  /** Read when the command starts: a mistyped VHDVAULT_WAIT_S is an error at once, not on the first wait. */
  private readonly limit = waitLimitMs();

  constructor(
    private readonly repo: Repository,
    private readonly disk: string,
    private readonly me: LockOwner,
    onWait?: (message: string) => void,
  ) {
    this.tell = onWait ?? ((m) => process.stderr.write(`vhdvault: ${m}\n`));
  }

  async on(owner: LockOwner | null, what: string): Promise<void> {
    const id = owner?.token ?? JSON.stringify(owner);
    const here = owner !== null && seenRunning(owner, this.me);
    const who = owner ? describeOwner(owner) : 'a process that left no record';
    const unlock = `\`vhdvault unlock ${this.repo.root} ${this.disk}\``;
    if (!this.since.has(id)) {
      this.since.set(id, Date.now());
      const end = here ? 'it runs here: the wait ends when it does' : `if it is gone, run ${unlock}`;
      this.tell(`waiting for ${who} ${what}; ${end}`);
    }
    const { limit } = this;
    if (!here && Date.now() - this.since.get(id)! >= limit) {
      throw new VaultError(this.repo.diskDir(this.disk), `gave up after ${limit / 1000} s waiting for ${who} ${what}; if that process is gone, run ${unlock} (VHDVAULT_WAIT_S sets the wait)`);
    }
    // Quick at first (a merge takes moments), then once a second: an object store bills every look.
    await sleep(Math.min(1000, POLL_MS * 1.5 ** this.polls++));
  }
}
