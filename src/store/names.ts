import { createHash, randomBytes } from 'node:crypto';
import { key } from '../storage/Storage.js';
import { UsageError } from '../util/errors.js';
import { processAlive } from '../util/processes.js';

/** Disk names and backup ids become path components: only plain, safe characters. */
const SAFE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export function checkDiskName(name: string): string {
  if (!SAFE_NAME.test(name) || name.includes('..')) {
    throw new UsageError(`invalid disk name "${name}": use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit, no '..'`);
  }
  return name;
}

const BACKUP_ID = /^\d{8}T\d{9}Z-[0-9a-f]{6}$/;

export function checkBackupId(id: string): string {
  if (!BACKUP_ID.test(id)) throw new UsageError(`invalid backup id "${id}" (expected like 20261122T043800123Z-a1b2c3)`);
  return id;
}

export function isBackupId(id: string): boolean {
  return BACKUP_ID.test(id);
}

/** UTC time to the millisecond, then 6 random hex digits: `20261122T043800123Z-a1b2c3`. */
function idAt(date: Date): string {
  const stamp = date.toISOString().replace(/[-:.]/g, '');
  return `${stamp}-${randomBytes(3).toString('hex')}`;
}

/**
 * A new id that sorts after `after` (the disk's latest backup), so that id
 * order is creation order even if the clock stepped back.
 */
export function newBackupId(after?: string, now = new Date()): string {
  let time = now.getTime();
  let id = idAt(new Date(time));
  while (after !== undefined && id <= after) id = idAt(new Date(++time));
  return id;
}

/** `.<name>.tmp`: a name only vhdvault's own temporary files carry. */
export function isTemporaryName(name: string): boolean {
  return name.startsWith('.') && name.endsWith('.tmp');
}

/** A `.<name>.<pid>.<random>.tmp` name (util/fsync temporaryPath) of a process that is still running, not us. */
export function inUseByAnother(name: string): boolean {
  const pid = Number(/\.(\d+)\.[0-9a-f]{8}\.tmp$/.exec(name)?.[1] ?? NaN);
  return Number.isSafeInteger(pid) && pid !== process.pid && processAlive(pid);
}

/**
 * Keys of the pins kept under `folder` (overlays, replicas): a disk's folder
 * `<folder>/<disk>`, and in it one `<16 hex of SHA-256(what pins)>.json` per
 * pinning overlay folder or destination.
 */
export function pinKeys(folder: string): { pinsKey(disk: string): string; pinKey(disk: string, what: string): string } {
  const pinsKey = (disk: string) => key(folder, checkDiskName(disk));
  return { pinsKey, pinKey: (disk, what) => key(pinsKey(disk), `${createHash('sha256').update(what).digest('hex').slice(0, 16)}.json`) };
}
