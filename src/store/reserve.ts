import type { Storage } from '../storage/Storage.js';

/**
 * `reserve` at the repository's root: 4 MiB of stored zeros that only prune
 * gives back, so that on a completely full filesystem prune can still write its
 * lock, marker and journal and go on to free space. Recreated (when there is
 * room) after prune has freed some.
 */
const RESERVE_FILE = 'reserve';
const RESERVE_BYTES = 4 * 1024 * 1024;

export function isNoSpace(err: unknown): boolean {
  // Errors from worker threads arrive as plain Errors: their text is all that is left.
  return (err as NodeJS.ErrnoException)?.code === 'ENOSPC' || /ENOSPC|no space left on device/i.test(String((err as Error)?.message));
}

/** Create the reserve if it is missing; quietly nothing when there is no room for it. */
export async function ensureReserve(storage: Storage): Promise<void> {
  // An object store does not fill up as a filesystem does: nothing to hold back.
  if (!storage.capabilities.localFiles) return;
  if (await storage.head(RESERVE_FILE)) return;
  try {
    // Real zeros, not a hole: the point is blocks the filesystem has handed out.
    await storage.put(RESERVE_FILE, Buffer.alloc(RESERVE_BYTES));
  } catch (err) {
    if (!isNoSpace(err)) throw err;
  }
}

/** Give the reserve back to the storage; false when there was none. */
async function releaseReserve(storage: Storage): Promise<boolean> {
  if (!(await storage.head(RESERVE_FILE))) return false;
  await storage.delete(RESERVE_FILE);
  return true;
}

/**
 * Run `fn`; if it fails for lack of space, release the reserve and run it once
 * more (`fn` must be safe to rerun: prune's steps are journaled or idempotent).
 */
export async function withReserve<T>(storage: Storage, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    if (!isNoSpace(err) || !(await releaseReserve(storage))) throw err;
    return fn();
  }
}
