/**
 * What keeps prune from removing the backup an overlay sits on: each overlay
 * `serve --writable` makes is registered in the repository as
 * `overlays/<disk>/<hash of its folder>.json` ({dir, backup, uuid, host}). A
 * registration whose folder (on this host) no longer holds that overlay is
 * stale and removed; one from another host cannot be checked and always pins.
 */
import { readFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { isNotFound, key } from '../storage/Storage.js';
import { pinKeys } from './names.js';
import type { BackupMetadata, Repository } from './repository.js';

const PINS = 'overlays';

interface Pin {
  dir: string;
  backup: string;
  uuid: string;
  host: string;
}

const { pinsKey, pinKey } = pinKeys(PINS);

/** Record that the overlay in `dir` (an absolute, real path) sits on `meta`. */
export async function pinBackup(repo: Repository, meta: BackupMetadata, dir: string): Promise<void> {
  const pin: Pin = { dir, backup: meta.id, uuid: meta.uuid, host: hostname() };
  await repo.writeJson(pinKey(meta.disk, dir), pin);
}

/** Forget the overlay in `dir` (as pinBackup named it): its folder is being removed by the process that made it. */
export async function unpinBackup(repo: Repository, disk: string, dir: string): Promise<void> {
  await repo.storage.delete(pinKey(disk, dir)).catch((err: unknown) => {
    if (!isNotFound(err)) throw err;
  });
}

/** Does the folder still hold an overlay over this backup? */
async function stillThere(pin: Pin): Promise<boolean> {
  try {
    const info = JSON.parse(await readFile(join(pin.dir, 'overlay.json'), 'utf8')) as { uuid?: string };
    return info.uuid === pin.uuid;
  } catch {
    return false;
  }
}

/**
 * The backups of `disk` that overlays sit on, each with the overlay's folder.
 * Stale registrations are removed unless `dryRun` (call with the disk's lock held).
 */
export async function pinnedBackups(repo: Repository, disk: string, options: { dryRun?: boolean } = {}): Promise<Map<string, string>> {
  const pinned = new Map<string, string>();
  let names: string[];
  try {
    names = await repo.storage.list(pinsKey(disk));
  } catch (err) {
    if (isNotFound(err)) return pinned;
    throw err;
  }
  for (const name of names.filter((n) => n.endsWith('.json'))) {
    const k = key(pinsKey(disk), name);
    let pin: Pin;
    try {
      pin = JSON.parse((await repo.storage.get(k)).toString('utf8')) as Pin;
    } catch (err) {
      if (isNotFound(err)) continue;
      continue; // not ours to judge: an unreadable registration pins nothing and is left alone
    }
    if (typeof pin?.backup !== 'string' || typeof pin.dir !== 'string') continue;
    if (pin.host === hostname() && !(await stillThere(pin))) {
      if (!options.dryRun) await repo.storage.delete(k);
      continue;
    }
    pinned.set(pin.backup, pin.dir);
  }
  return pinned;
}
