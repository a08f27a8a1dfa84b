import { VaultError } from '../util/errors.js';
import { describeOwner, type LockOwner, lockOwner, seenRunning } from '../util/owner.js';
import { abandonedAccess } from './access.js';
import { lockRecords, removeIfUnchanged } from './lock.js';
import type { Repository } from './repository.js';

export interface Unlocked {
  /** The lock removed: its owner (null when unreadable), or undefined when there was none. */
  lock?: LockOwner | null;
  /** Reader registrations and writer markers removed, by owner. */
  access: LockOwner[];
}

/**
 * `vhdvault unlock`: remove what a process a person knows is gone left on a
 * disk: its lock (and takeover marker), and its reader registration or writer
 * marker, which would keep others waiting. One on another host, or in another
 * container, is never taken over automatically. Refused while the lock's owner
 * is seen running here; a registration seen running here stays.
 */
export async function unlockDisk(repo: Repository, disk: string): Promise<Unlocked> {
  await repo.requireDisk(disk);
  const me = lockOwner('unlock');
  const [lock, takeover] = await lockRecords(repo, disk).then((r) => [r.find((x) => !x.key.endsWith('.takeover')), r.find((x) => x.key.endsWith('.takeover'))]);
  if (lock?.holder && seenRunning(lock.holder, me)) {
    throw new VaultError(repo.diskDir(disk), `is locked by ${describeOwner(lock.holder)}, which is running: stop it, or let it finish, rather than unlock`);
  }
  const access = await abandonedAccess(repo, disk);
  if (!lock && access.keys.length === 0) throw new VaultError(repo.diskDir(disk), 'is not locked, and no reader or writer left a registration');
  if (lock) await removeIfUnchanged(repo.storage, lock.key, lock.text);
  // A takeover marker a gone process left would stop every later taker; one a live process holds here is its own.
  if (takeover && !(takeover.holder && seenRunning(takeover.holder, me))) await removeIfUnchanged(repo.storage, takeover.key, takeover.text);
  for (const k of access.keys) await repo.storage.delete(k);
  return { lock: lock ? lock.holder : undefined, access: access.owners };
}
