import { realpath } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { pathExists } from '../util/files.js';
import { chainMembers, describeDisk, type VhdDescription } from '../vhd/describe.js';
import { verifiedChain } from './chain.js';
import { CONFIG_FILE } from './keys.js';
import { readingDisk } from './merge.js';
import { isBackupId } from './names.js';
import { type BackupMetadata, Repository } from './repository.js';
import { pickBackup } from './restore.js';

/**
 * A backup named by where it is, `<repository>/disks/<disk>/<id>`, in a folder
 * or on an object store, in any layout: how the `vhd` tools take a backup.
 * Its metadata (`<id>.json`) or digests (`<id>.digests`) name it too: neither
 * is a disk to read as raw bytes.
 */
export interface NamedBackup {
  root: string;
  disk: string;
  id: string;
}

/** `<id>`, `<id>.json` or `<id>.digests`: the backup id, else null. */
function idNamed(name: string): string | null {
  const id = name.replace(/\.(json|digests)$/, '');
  return isBackupId(id) ? id : null;
}

/** The backup `path` names (see NamedBackup), or null when it names none. */
export async function namedBackup(path: string): Promise<NamedBackup | null> {
  const s3 = /^(s3:\/\/.+?)\/disks\/([^/]+)\/([^/]+?)\/?$/.exec(path);
  if (s3) return idNamed(s3[3]!) === null ? null : { root: s3[1]!, disk: s3[2]!, id: idNamed(s3[3]!)! };
  const id = idNamed(basename(path));
  const diskDir = id === null ? null : await realpath(dirname(path)).catch(() => null);
  if (diskDir === null || basename(dirname(diskDir)) !== 'disks') return null;
  const root = dirname(dirname(diskDir));
  return (await pathExists(join(root, CONFIG_FILE))) ? { root, disk: basename(diskDir), id: id! } : null;
}

/** Run `fn` over the named backup, as a reader of its disk (no merge or deletion runs beside it). */
export async function readingBackup<T>(named: NamedBackup, fn: (repo: Repository, meta: BackupMetadata) => Promise<T>): Promise<T> {
  const repo = await Repository.open(named.root);
  return readingDisk(repo, named.disk, 'vhd', async () => fn(repo, await pickBackup(repo, named.disk, named.id)));
}

/** What `vhd info` says of a backup: its own data as a VHD, and the chain a restore reads. */
export async function describeBackup(path: string, repo: Repository, meta: BackupMetadata): Promise<VhdDescription> {
  const { chain, source } = await verifiedChain(repo, meta);
  try {
    return await describeDisk(path, chain.top, { ...chainMembers(chain), storedBytes: meta.bytesStored });
  } finally {
    await source.close();
  }
}

/** Read every block of a backup against its digests (what a restore checks); resolves to what its data is. */
export async function checkBackup(repo: Repository, meta: BackupMetadata): Promise<{ type: string; size: number; depth: number }> {
  const { chain, source } = await verifiedChain(repo, meta);
  try {
    for (let b = 0; b < source.blockCount; b++) await source.readBlock(b);
    return { type: chain.top.footer.diskType, size: chain.size, depth: chain.members.length };
  } finally {
    await source.close();
  }
}
