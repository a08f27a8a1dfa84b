import type { VhdDisk } from '../vhd/disk.js';
import { VhdError } from '../vhd/errors.js';
import { openDisk } from '../vhd/openDisk.js';
import { VhdChain } from '../vhd/VhdChain.js';
import type { BackupMetadata, Repository } from './repository.js';

/**
 * A backup's ancestors from the repository's own metadata, the backup first:
 * parents are found by id in the disk's folder, never through the locators in
 * the VHDs (which may name paths outside a moved or copied repository).
 */
export async function lineage(repo: Repository, meta: BackupMetadata): Promise<BackupMetadata[]> {
  const out = [meta];
  const seen = new Set([meta.id]);
  for (let m = meta; m.parent !== null; ) {
    const parentId = m.parent;
    if (seen.has(parentId)) throw new VhdError(repo.diskDir(meta.disk), `backup ${m.id}: its parent chain loops back to ${parentId}`);
    const parent = await repo.backup(meta.disk, parentId).catch((err: unknown) => {
      if (!(err instanceof VhdError)) throw err;
      throw new VhdError(repo.diskDir(meta.disk), `backup ${m.id}: its parent backup ${parentId} is not in the repository`);
    });
    seen.add(parentId);
    out.push(parent);
    m = parent;
  }
  return out;
}

/** Open one backup's data, naming the backup when it cannot be opened. */
export async function openBackupData(repo: Repository, meta: BackupMetadata): Promise<VhdDisk> {
  const path = repo.dataPath(meta.disk, meta.id, meta.layout);
  let disk: VhdDisk;
  try {
    disk = await openDisk(path);
  } catch (err) {
    if (!(err instanceof VhdError)) throw err;
    throw new VhdError(err.file, `${err.problem} (data of backup ${meta.id})`);
  }
  if (disk.footer.uuid !== meta.uuid) {
    await disk.close();
    throw new VhdError(path, `has UUID ${disk.footer.uuid}, backup ${meta.id} records ${meta.uuid}`);
  }
  return disk;
}

/** The chain a restore reads for `meta`, resolved by metadata and checked link by link. */
export async function openBackupChain(repo: Repository, meta: BackupMetadata): Promise<VhdChain> {
  const members: VhdDisk[] = [];
  try {
    for (const m of await lineage(repo, meta)) members.push(await openBackupData(repo, m));
  } catch (err) {
    await Promise.all(members.map((m) => m.close()));
    throw err;
  }
  return VhdChain.fromMembers(members);
}
