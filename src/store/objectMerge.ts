import { VaultError } from '../util/errors.js';
import { key } from '../storage/Storage.js';
import { loadBlockMap } from './blockObjects.js';
import { isBackupId } from './names.js';
import type { BackupMetadata, Repository } from './repository.js';

/**
 * A retention merge in the objects layout (DESIGN.md §4.15). The child's block
 * map already names every block of the disk at its point in time, so folding
 * the child into its removed parent moves no block: the child's metadata is
 * rewritten to take the parent's place (its parent, its kind), then the parent
 * is deleted like any removed backup. Block objects only the parent named are
 * garbage the prune collects afterwards (blockObjects.ts collectGarbage).
 */

/** `merge.json` of the objects layout: the two backups and the child's metadata as it will be. */
export interface ObjectMergeJournal {
  format: 1;
  parent: BackupMetadata;
  child: BackupMetadata;
  merged: BackupMetadata;
}

const journalKey = (repo: Repository, disk: string) => key(repo.diskKey(disk), 'merge.json');

/**
 * The child in the parent's place: the blocks it changed counted against its new
 * parent; their bytes estimated at the two backups' average object size (reading
 * every object's size would cost a request each).
 */
async function mergedMetadata(repo: Repository, parent: BackupMetadata, child: BackupMetadata): Promise<BackupMetadata> {
  const map = await loadBlockMap(repo, child);
  const base = parent.parent === null ? null : await loadBlockMap(repo, await repo.backup(parent.disk, parent.parent));
  const perObject = (parent.bytesWritten + child.bytesWritten) / Math.max(1, parent.blocksWritten + child.blocksWritten);
  let changed = 0;
  for (let b = 0; b < map.blockCount; b++) if (base && b < base.blockCount ? !map.digest(b).equals(base.digest(b)) : map.hasObject(b)) changed++;
  return {
    ...child,
    parent: parent.parent,
    kind: parent.kind,
    blocksWritten: changed,
    bytesWritten: Math.round(changed * perObject),
    bytesStored: Math.round(changed * perObject) + map.bytes.length,
  };
}

/** Fold `child` into `parent` (removed). Call holding the disk's lock and exclusive access. */
export async function mergeObjectsForward(repo: Repository, parent: BackupMetadata, child: BackupMetadata): Promise<void> {
  const journal: ObjectMergeJournal = { format: 1, parent, child, merged: await mergedMetadata(repo, parent, child) };
  await repo.writeJson(journalKey(repo, child.disk), journal);
  await finishObjectMerge(repo, journal);
}

/**
 * Every step is idempotent: the child's metadata is written (again), the parent
 * deleted if still listed (deletion intent first, §4.9), the journal removed last.
 */
async function finishObjectMerge(repo: Repository, journal: ObjectMergeJournal): Promise<void> {
  const { parent, child, merged } = journal;
  await repo.writeJson(repo.metadataKey(child.disk, child.id), merged);
  const stillListed = await repo.backup(parent.disk, parent.id).catch(() => null);
  if (stillListed) await repo.deleteBackup(stillListed);
  await repo.storage.delete(journalKey(repo, child.disk));
}

/** Is this parsed journal an objects-layout one? */
export function isObjectMergeJournal(value: unknown): boolean {
  return (value as { child?: { layout?: unknown } } | null)?.child?.layout === 'objects';
}

/**
 * Resume an interrupted objects-layout merge from its journal, after checking
 * it names this disk's backups as they are: the child listed either as it was
 * (a child of the parent) or as the journal's merged result.
 */
export async function completeObjectMerge(repo: Repository, disk: string, value: unknown, damaged: (what: string) => VaultError): Promise<void> {
  const j = value as ObjectMergeJournal;
  const sound =
    j.format === 1 &&
    j.parent?.disk === disk &&
    j.child?.disk === disk &&
    j.merged?.disk === disk &&
    isBackupId(String(j.parent.id)) &&
    isBackupId(String(j.child.id)) &&
    j.merged.id === j.child.id &&
    j.child.parent === j.parent.id &&
    j.merged.parent === j.parent.parent;
  if (!sound) throw damaged('is damaged (not a merge journal of this disk)');
  const now = await repo.backup(disk, j.child.id).catch(() => null);
  if (!now) throw damaged(`does not match the disk (backup ${j.child.id} is not listed): it may be stale or copied from elsewhere`);
  if (now.uuid !== j.child.uuid || (now.parent !== j.parent.id && now.parent !== j.merged.parent)) {
    throw damaged(`does not match the disk (backup ${j.child.id} is neither a child of ${j.parent.id} nor the merged result): it may be stale or copied from elsewhere`);
  }
  await finishObjectMerge(repo, j);
}
