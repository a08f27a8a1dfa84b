import { mkdir, open, readdir, readFile, rename, rm, unlink } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { VhdError } from '../vhd/errors.js';
import { describeOwner, isOwnerGone, type LockOwner, lockOwner, parseOwner } from './lock.js';
import type { Repository } from './repository.js';

/**
 * Readers and destructive writers of one disk, kept apart (DESIGN.md §5.6).
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

function accessDir(repo: Repository, disk: string): string {
  return join(repo.root, ACCESS_DIR, disk);
}

async function readOwner(path: string): Promise<LockOwner | null> {
  const text = await readFile(path, 'utf8').catch(() => null);
  return text === null ? null : parseOwner(text);
}

/** Give `path` our owner record at once (written aside, then renamed): nobody ever reads it half-written. */
async function publish(path: string, owner: LockOwner): Promise<void> {
  const temp = `${join(path, '..')}/.${randomBytes(6).toString('hex')}.tmp`;
  const fh = await open(temp, 'wx');
  try {
    await fh.writeFile(JSON.stringify(owner));
  } finally {
    await fh.close();
  }
  await rename(temp, path).catch(async (err: unknown) => {
    await rm(temp, { force: true });
    throw err;
  });
}

/** Register as a reader; false where the repository cannot be written (a read-only copy has no writers to fear). */
async function register(path: string, owner: LockOwner): Promise<boolean> {
  try {
    await mkdir(join(path, '..'), { recursive: true });
    await publish(path, owner);
    return true;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EROFS' || code === 'EACCES' || code === 'EPERM') return false;
    throw new VhdError(path, `cannot register as a reader: ${(err as Error).message}`);
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
  const dir = accessDir(repo, disk);
  const me = lockOwner(command);
  const path = join(dir, `reader-${process.pid}-${randomBytes(4).toString('hex')}`);
  let told = false;
  for (;;) {
    const registered = await register(path, me);
    const writer = await readOwner(join(dir, MARKER));
    if (writer && !isOwnerGone(writer, me)) {
      if (registered) await unlink(path).catch(() => undefined);
      if (!told) options.onWait?.(`waiting for ${describeOwner(writer)} to finish changing ${disk}`);
      told = true;
      await sleep(POLL_MS);
      continue;
    }
    if (options.recover && (await options.recover.pending())) {
      if (registered) await unlink(path).catch(() => undefined);
      await options.recover.settle();
      continue;
    }
    try {
      return await fn();
    } finally {
      if (registered) await unlink(path).catch(() => undefined);
    }
  }
}

/**
 * Run `fn` (which changes committed data of `disk`) once no reader is left;
 * readers arriving meanwhile wait. Call with the disk's lock held.
 */
export async function withExclusiveAccess<T>(repo: Repository, disk: string, command: string, fn: () => Promise<T>, options: AccessOptions = {}): Promise<T> {
  const dir = accessDir(repo, disk);
  const me = lockOwner(command);
  const marker = join(dir, MARKER);
  await mkdir(dir, { recursive: true });
  await publish(marker, me).catch((err: unknown) => {
    throw new VhdError(marker, `cannot be written: ${(err as Error).message}`);
  });
  try {
    let told = false;
    for (;;) {
      const live: LockOwner[] = [];
      for (const name of await readdir(dir)) {
        if (!name.startsWith('reader-')) continue;
        const owner = await readOwner(join(dir, name));
        if (owner === null) continue; // unregistered meanwhile (files appear whole, by rename)
        if (isOwnerGone(owner, me)) await rm(join(dir, name), { force: true });
        else live.push(owner);
      }
      if (live.length === 0) break;
      if (!told) options.onWait?.(`waiting for ${live.length === 1 ? describeOwner(live[0]!) : `${live.length} readers`} to finish reading ${disk}`);
      told = true;
      await sleep(POLL_MS);
    }
    return await fn();
  } finally {
    await rm(marker, { force: true });
  }
}
