import { isNotFound } from '../storage/Storage.js';
import { VaultError } from '../util/errors.js';
import type { BackupMetadata } from './metadata.js';

/** What resolving a chain needs: committed backups by id, and how to name their disk. */
export interface BackupLookup {
  backup(disk: string, id: string): Promise<BackupMetadata>;
  diskDir(disk: string): string;
}

/**
 * A backup's ancestors from the repository's own metadata, the backup first:
 * parents are found by id in the disk's folder, never through the locators in
 * the VHDs (which may name paths outside a moved or copied repository).
 */
export async function lineage(repo: BackupLookup, meta: BackupMetadata): Promise<BackupMetadata[]> {
  const out = [meta];
  const seen = new Set([meta.id]);
  for (let m = meta; m.parent !== null; ) {
    const parentId = m.parent;
    if (seen.has(parentId)) throw new VaultError(repo.diskDir(meta.disk), `backup ${m.id}: its parent chain loops back to ${parentId}`);
    const parent = await repo.backup(meta.disk, parentId).catch((err: unknown) => {
      if (!(err instanceof VaultError)) throw err;
      // Absent, or there but unreadable (damaged metadata, a failed read): the second says which file and why.
      if (isNotFound(err)) throw new VaultError(repo.diskDir(meta.disk), `backup ${m.id}: its parent backup ${parentId} is not in the repository`);
      throw new VaultError(repo.diskDir(meta.disk), `backup ${m.id}: its parent backup ${parentId} cannot be read (${err.message})`);
    });
    seen.add(parentId);
    out.push(parent);
    m = parent;
  }
  return out;
}
