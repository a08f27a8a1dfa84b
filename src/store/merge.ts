import { isNotFound } from '../storage/Storage.js';
import { VaultError } from '../util/errors.js';
import { withExclusiveAccess, withReadAccess } from './access.js';
import { mergeJournalKey, metadataKey } from './keys.js';
import type { LayoutMerge, MergeJournal } from './layouts/Layout.js';
import { withDiskLock } from './lock.js';
import { LAYOUT_NAMES, metadataText } from './metadata.js';
import { isBackupId } from './names.js';
import { isNoSpace } from './reserve.js';
import type { BackupMetadata, Repository } from './repository.js';

/**
 * Retention merges (docs/design/04-repository.md §4.9): `disks/<disk>/merge.json` is written
 * (durably) before the first change; every later step is idempotent, so
 * whoever finds the journal (any command that takes the disk's lock) runs the
 * merge to its end. The steps are the layout's; the last, the commit, is the
 * same for all: the child's metadata describes the merged result, the parent
 * is deleted (deletion intent first), the journal goes.
 */

const COMMIT = 'metadata';

const stepsOf = (merge: LayoutMerge) => [...merge.steps, COMMIT];

async function advance(repo: Repository, journal: MergeJournal, step: string): Promise<void> {
  journal.step = step;
  await repo.writeJson(mergeJournalKey(journal.child.disk), journal);
}

/** Run the journal's steps from where it stands, then commit. */
async function runJournal(repo: Repository, journal: MergeJournal, resumed: boolean): Promise<void> {
  const { merge } = repo.layoutOf(journal.child);
  const steps = stepsOf(merge);
  for (let i = steps.indexOf(journal.step); steps[i] !== COMMIT; i++) {
    await merge.run(repo, journal, steps[i]!, resumed);
    await advance(repo, journal, steps[i + 1]!);
  }
  const { parent, child } = journal;
  await repo.storage.put(metadataKey(child.disk, child.id), metadataText(merge.merged(journal)));
  // Still listed unless its metadata is gone: a failed read is an error, never "already deleted".
  if (await repo.storage.head(metadataKey(parent.disk, parent.id))) await repo.deleteBackup(await repo.backup(parent.disk, parent.id));
  // Not durable on its own: a journal a crash brings back stands at this step, whose rerun changes nothing.
  await repo.storage.delete(mergeJournalKey(child.disk), { durable: false });
}

/**
 * runJournal, saying what a failure leaves: a merge begun (its journal written)
 * and not finished, which the next command on the disk finishes. Without that,
 * the failed read or write alone reads as if nothing had changed. A full
 * filesystem's error stays as it is: prune gives back its reserve and reruns.
 */
async function runToEnd(repo: Repository, journal: MergeJournal, resumed: boolean): Promise<void> {
  try {
    await runJournal(repo, journal, resumed);
  } catch (err) {
    if (!(err instanceof VaultError) || isNoSpace(err)) throw err;
    const { parent, child } = journal;
    throw new VaultError(
      repo.diskDir(child.disk),
      `the merge of backup ${parent.id} into ${child.id} is interrupted (${err.message}): its journal merge.json is kept, and the next prune, backup, list, restore or verify of disk ${child.disk} finishes it`,
    );
  }
}

/**
 * Fold `child` into its parent `parent` (which is being removed): the result
 * holds the child's content under the child's id, UUID and timestamp, with the
 * parent's place in the chain (a full backup when the parent was full).
 * Call with the disk's lock held and exclusive access.
 */
export async function mergeForward(repo: Repository, parent: BackupMetadata, child: BackupMetadata, options: { reclaim?: boolean } = {}): Promise<void> {
  if (child.parent !== parent.id) throw new Error(`${child.id} is not a child of ${parent.id}`);
  if (parent.layout !== child.layout) throw new VaultError(repo.diskDir(child.disk), 'cannot merge backups of different layouts');
  const { merge } = repo.layoutOf(child);
  const journal: MergeJournal = { format: 1, parent, child, step: stepsOf(merge)[0]!, ...(await merge.begin(repo, parent, child)) };
  await repo.writeJson(mergeJournalKey(child.disk), journal);
  await runToEnd(repo, journal, false);
  if (options.reclaim ?? true) await merge.reclaim(repo, journal);
}

/**
 * Free the space a merge set aside, and recount the merged backup's size: what
 * the merge's reclaim does (cleanLeftovers alone would also free it). Call with the lock held.
 */
export async function reclaimMergeSpace(repo: Repository, parent: BackupMetadata, child: BackupMetadata): Promise<void> {
  await repo.cleanLeftovers(child.disk);
  await repo.layoutOf(child).merge.reclaim(repo, { format: 1, parent, child, step: COMMIT });
}

/** The journal as read, checked for shape; `damaged` says why it cannot be used. */
function parseJournal(repo: Repository, disk: string, text: string, damaged: (what: string) => VaultError): MergeJournal {
  let j: MergeJournal;
  try {
    j = JSON.parse(text) as MergeJournal;
  } catch {
    throw damaged('is damaged (not valid JSON)');
  }
  const shaped =
    j !== null &&
    typeof j === 'object' &&
    j.format === 1 &&
    j.child?.disk === disk &&
    j.parent?.disk === disk &&
    isBackupId(String(j.parent?.id)) &&
    isBackupId(String(j.child?.id)) &&
    j.child.parent === j.parent.id &&
    LAYOUT_NAMES.includes(j.child.layout);
  if (!shaped) throw damaged('is damaged (not a merge journal of this disk)');
  const { merge } = repo.layoutOf(j.child);
  // A journal of an earlier version without steps starts at the first.
  j.step ??= stepsOf(merge)[0]!;
  if (!stepsOf(merge).includes(j.step) || !merge.sound(j)) throw damaged('is damaged (not a merge journal of this disk)');
  return j;
}

/** Finish a merge an interrupted run left behind, if any. Call with the disk's lock held. */
export async function completePendingMerge(repo: Repository, disk: string): Promise<boolean> {
  const path = repo.storage.describe(mergeJournalKey(disk));
  let text: string;
  try {
    text = (await repo.storage.get(mergeJournalKey(disk))).toString('utf8');
  } catch (err) {
    if (isNotFound(err)) return false;
    throw err;
  }
  const damaged = (what: string) =>
    new VaultError(
      path,
      `the journal of an interrupted retention merge ${what}, so the merge cannot be finished and nothing on this disk is changed or read until it is resolved: ` +
        'put back an intact copy of the file if you have one; otherwise move it out of the folder and run `vhdvault verify` to see which backups the half-done merge damaged',
    );
  const journal = parseJournal(repo, disk, text, damaged);
  const { merge } = repo.layoutOf(journal.child);
  const mismatch = await merge.mismatch(repo, journal);
  if (mismatch) throw damaged(`does not match the disk (${mismatch}): it may be stale or copied from elsewhere`);
  await runToEnd(repo, journal, true);
  await merge.reclaim(repo, journal);
  return true;
}

/** Is a merge journal present (a merge running, or abandoned by a killed run)? */
export function hasPendingMerge(repo: Repository, disk: string): Promise<boolean> {
  return repo.storage.head(mergeJournalKey(disk)).then((x) => x !== null);
}

/**
 * For commands that only read, seeing an abandoned merge: take the disk's lock
 * just long enough to finish it. Throws LockBusyError while another process
 * holds the lock (every writer finishes the merge first): the reader waits, saying for whom.
 */
export async function settlePendingMerge(repo: Repository, disk: string): Promise<void> {
  await withDiskLock(repo, disk, 'merge recovery', (lock) => withExclusiveAccess(repo, disk, lock, () => completePendingMerge(repo, disk)));
}

/** Run `fn` as a reader of `disk` (see access.ts), finishing an abandoned merge first. */
export function readingDisk<T>(repo: Repository, disk: string, command: string, fn: () => Promise<T>, onWait?: (message: string) => void): Promise<T> {
  return withReadAccess(repo, disk, command, fn, {
    onWait,
    recover: { pending: () => hasPendingMerge(repo, disk), settle: () => settlePendingMerge(repo, disk) },
  });
}
