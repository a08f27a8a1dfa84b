import { open, rename, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { fsyncDirectory, removeQuietly, temporaryPath } from '../util/fsync.js';
import { pathExists } from '../util/files.js';
import type { Repository } from './repository.js';

/**
 * `reserve` at the repository's root: 4 MiB of allocated space that only prune
 * gives back, so that on a completely full filesystem prune can still write its
 * lock, marker and journal and go on to free space. Recreated (when there is
 * room) after prune has freed some.
 */
const RESERVE_FILE = 'reserve';
const RESERVE_BYTES = 4 * 1024 * 1024;

export function isNoSpace(err: unknown): boolean {
  return (err as NodeJS.ErrnoException)?.code === 'ENOSPC' || /ENOSPC|no space left on device/i.test(String((err as Error)?.message));
}

/** Create the reserve if it is missing; quietly nothing when there is no room for it. */
export async function ensureReserve(repo: Repository): Promise<void> {
  const path = join(repo.root, RESERVE_FILE);
  if (await pathExists(path)) return;
  const temp = temporaryPath(path);
  try {
    const fh = await open(temp, 'wx');
    try {
      // Real zeros, not a hole: the point is blocks the filesystem has handed out.
      const zeros = Buffer.alloc(1024 * 1024);
      for (let at = 0; at < RESERVE_BYTES; at += zeros.length) await fh.write(zeros, 0, zeros.length, at);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(temp, path);
    await fsyncDirectory(repo.root);
  } catch (err) {
    await removeQuietly(temp);
    if (!isNoSpace(err)) throw err;
  }
}

/** Give the reserve back to the filesystem; false when there was none. */
async function releaseReserve(repo: Repository): Promise<boolean> {
  return unlink(join(repo.root, RESERVE_FILE)).then(
    () => true,
    () => false,
  );
}

/**
 * Run `fn`; if it fails for lack of space, release the reserve and run it once
 * more (`fn` must be safe to rerun: prune's steps are journaled or idempotent).
 */
export async function withReserve<T>(repo: Repository, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (!isNoSpace(err) || !(await releaseReserve(repo))) throw err;
    return fn();
  }
}
