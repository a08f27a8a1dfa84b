import { realpath } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { VaultError } from '../util/errors.js';
import { pathExists } from '../util/files.js';
import { readingDisk } from './merge.js';
import { vhdDataId } from './layouts/index.js';
import { Repository } from './repository.js';

/**
 * The repository and disk a path belongs to, when it is a backup's data
 * (`<repo>/disks/<disk>/<id>.vhd-dir` or `.vhd`, or anything inside one: the VHDs of the dir and vhd layouts), else null.
 */
async function owningDisk(path: string): Promise<{ root: string; disk: string } | null> {
  let p = await realpath(path).catch(() => null);
  while (p && dirname(p) !== p) {
    const name = basename(p);
    const diskDir = dirname(p);
    const disks = dirname(diskDir);
    if (vhdDataId(name) !== null && basename(disks) === 'disks') {
      const root = dirname(disks);
      if (await pathExists(join(root, 'vhdvault.json'))) return { root, disk: basename(diskDir) };
    }
    p = dirname(p);
  }
  return null;
}

/**
 * Run `fn` (a `vhd` tool reading `path`) as a reader of the repository disk the
 * path is part of, if any: a prune merging that disk meanwhile would move block
 * files under it (docs/design/04-repository.md §4.11). Other paths are read as they are.
 */
export async function readingPath<T>(path: string, fn: () => Promise<T>): Promise<T> {
  const owner = await owningDisk(path);
  if (!owner) return fn();
  // Its files are sealed: no VHD tool reads them, whatever the password.
  if ((await Repository.configOf(owner.root)).encryption) {
    throw new VaultError(path, `is part of the encrypted repository ${owner.root}: its files are sealed; read the backup with vhdvault restore (or vhd convert <repo>/disks/<disk>/<id>)`);
  }
  const repo = await Repository.open(owner.root);
  return readingDisk(repo, owner.disk, 'vhd', fn);
}
