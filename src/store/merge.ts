import { open } from 'node:fs/promises';
import pLimit from 'p-limit';
import { bitmapByteSize, fullBitmap, isBitmapFull, isSectorSet, setBit, setSector } from '../vhd/bitmap.js';
import { compress } from '../vhd/compression.js';
import { FOOTER_SIZE, SECTOR_SIZE } from '../vhd/constants.js';
import type { StoredBlock, VhdDisk } from '../vhd/disk.js';
import { VaultError } from '../util/errors.js';
import { parseFooter, serializeFooter } from '../vhd/footer.js';
import { BAT_FILE, blockFile, FOOTER_FILE, VhdDirectory } from '../vhd/VhdDirectory.js';
import { VhdFile } from '../vhd/VhdFile.js';
import { openDisk } from '../vhd/openDisk.js';
import { setTimeout as sleep } from 'node:timers/promises';
import { withExclusiveAccess, withReadAccess } from './access.js';
import { LockBusyError, withDiskLock } from './lock.js';
import { isBackupId } from './names.js';
import { type BackupMetadata, type Repository } from './repository.js';
import { type BatchOp, isNotFound, key, type Storage } from '../storage/Storage.js';
import { completeObjectMerge, isObjectMergeJournal, mergeObjectsForward } from './objectMerge.js';

/**
 * `disks/<disk>/merge.json`: a merge in progress. Written (durably) before the
 * first change; every later step is idempotent, so whoever finds the journal
 * (any command that takes the disk's lock) runs the merge to its end.
 */
interface MergeJournal {
  format: 1;
  /** The backup being removed: its data becomes the merged result. */
  parent: BackupMetadata;
  /** The backup above it: the merged result takes its identity. */
  child: BackupMetadata;
  /** The merged result's footer: the parent's with the child's UUID and timestamp (base64). */
  footer: string;
  step: 'blocks' | 'identity' | 'swap' | 'metadata';
}

const JOURNAL = 'merge.json';
const journalKey = (repo: Repository, disk: string) => key(repo.diskKey(disk), JOURNAL);
/** The child's data, moved aside by the swap (the merged result takes its name). */
const trashName = (childData: string) => `.${childData}.merged.tmp`;
/** The parent's blocks that the child's replaced (renaming over them would free them on the spot). */
const replacedName = (parentId: string) => `.${parentId}.replaced.tmp`;


/**
 * A partial child block laid over the parent's block (or zeros): the child's
 * sectors win. Over a differencing parent the result keeps the union of both
 * bitmaps, so sectors neither holds still come from further down the chain;
 * over a full disk every sector is defined (absent ones read as zeros).
 * Idempotent: laying the child over an already combined block changes nothing.
 */
function overlay(parent: StoredBlock | null, child: StoredBlock, blockSize: number, parentIsDifferencing: boolean): StoredBlock {
  const data = parent ? Buffer.from(parent.data) : Buffer.alloc(blockSize);
  const bitmap = !parentIsDifferencing ? fullBitmap(blockSize) : parent ? Buffer.from(parent.bitmap) : Buffer.alloc(bitmapByteSize(blockSize));
  for (let s = 0; s < blockSize / SECTOR_SIZE; s++) {
    if (!isSectorSet(child.bitmap, s)) continue;
    child.data.copy(data, s * SECTOR_SIZE, s * SECTOR_SIZE, (s + 1) * SECTOR_SIZE);
    setSector(bitmap, s);
  }
  return { bitmap, data };
}

/** Is this stored block whole (every sector present)? Reads only the bitmap of an uncompressed file. */
async function wholeBlockInDirectory(storage: Storage, dirKey: string, dir: VhdDirectory, block: number): Promise<boolean> {
  const sectors = dir.blockSize / SECTOR_SIZE;
  if (dir.compression === 'none') {
    const bitmap = await storage.get(key(dirKey, blockFile(block)), { offset: 0, length: bitmapByteSize(dir.blockSize) });
    return isBitmapFull(bitmap, sectors);
  }
  const stored = await dir.readBlock(block);
  return stored !== null && isBitmapFull(stored.bitmap, sectors);
}

class Merge {
  constructor(
    private readonly repo: Repository,
    private readonly journal: MergeJournal,
    /** Resuming an interrupted run: steps must check what that run already did. */
    private readonly resumed: boolean,
  ) {}

  private get disk(): string {
    return this.journal.child.disk;
  }
  private get storage(): Storage {
    return this.repo.storage;
  }
  private get parentKey(): string {
    return this.repo.dataKey(this.disk, this.journal.parent.id, this.journal.parent.layout);
  }
  private get childKey(): string {
    return this.repo.dataKey(this.disk, this.journal.child.id, this.journal.child.layout);
  }
  private get parentPath(): string {
    return this.repo.path(this.parentKey);
  }
  private get childPath(): string {
    return this.repo.path(this.childKey);
  }

  private async advance(step: MergeJournal['step']): Promise<void> {
    this.journal.step = step;
    await this.repo.writeJson(journalKey(this.repo, this.disk), this.journal);
  }

  async run(): Promise<void> {
    if (this.journal.step === 'blocks') {
      await (this.journal.parent.layout === 'dir' ? this.directoryBlocks() : this.fileBlocks());
      await this.advance('identity');
    }
    if (this.journal.step === 'identity') {
      await (this.journal.parent.layout === 'dir' ? this.directoryIdentity() : this.fileIdentity());
      await this.advance('swap');
    }
    if (this.journal.step === 'swap') {
      await this.swap();
      await this.advance('metadata');
    }
    await this.metadata();
  }

  /**
   * Every block of the child goes into the parent's blocks/: a whole block is
   * renamed over the parent's (no data copied; one rename per block); a partial
   * one is combined with the parent's block. Idempotent: a child block file that
   * is gone was moved by an interrupted run. Until the swap, only merge recovery
   * reads these two backups (every command finishes a pending merge first).
   */
  private async directoryBlocks(): Promise<void> {
    const parent = await VhdDirectory.open(this.parentPath);
    const child = await VhdDirectory.open(this.childPath);
    // vhdvault stores whole blocks only (DESIGN.md §4.3); other writers' blocks are checked one by one.
    const knownWhole = this.journal.child.wholeBlocks === true && child.compression === parent.compression;
    const parentIsDifferencing = parent.footer.diskType === 'differencing';
    const replaced = key(this.repo.diskKey(this.disk), replacedName(this.journal.parent.id));
    const limit = pLimit(16);
    const aside: Array<[string, string]> = [];
    const moves: Array<[string, string]> = [];
    const partial: number[] = [];
    await Promise.all(
      Array.from({ length: child.blockCount }, (_, b) => b)
        .filter((b) => child.isAllocated(b))
        .map((b) =>
          limit(async () => {
            const source = key(this.childKey, blockFile(b));
            const target = key(this.parentKey, blockFile(b));
            const whole = knownWhole || (child.compression === parent.compression && (await wholeBlockInDirectory(this.storage, this.childKey, child, b).catch(() => true)));
            if (!whole) return void partial.push(b);
            // Resume: a child block file that is gone was moved by the interrupted run; then
            // `target` already holds the child's data and must not be moved aside again.
            // (A fresh run knows every source exists: the structure was checked, and spares the look-up.)
            if (this.resumed && !(await this.storage.head(source))) return;
            // Move the replaced block aside first: freeing 2 MiB inside the rename costs ~40× the rename.
            if (parent.isAllocated(b)) aside.push([target, key(replaced, String(b))]);
            moves.push([source, target]);
          }),
        ),
    );
    const move = this.storage.moveAll?.bind(this.storage);
    if (!move) throw new VaultError(this.repo.root, 'this storage cannot rename: a dir-layout merge needs it');
    await move(aside, { ignoreMissing: true });
    await move(moves, { ignoreMissing: this.resumed });
    // A partial block is combined with the parent's and stored whole over it; the child's file goes after.
    for (const b of partial) {
      const stored = await child.readBlock(b).catch(() => null);
      if (stored === null) continue; // already combined and removed by an interrupted run
      const merged = isBitmapFull(stored.bitmap, child.blockSize / SECTOR_SIZE) ? stored : overlay(await parent.readBlock(b).catch(() => null), stored, child.blockSize, parentIsDifferencing);
      await this.storage.put(key(this.parentKey, blockFile(b)), await compress(parent.compression, Buffer.concat([merged.bitmap, merged.data])));
      await this.storage.delete(key(this.childKey, blockFile(b)));
    }
  }

  /** The parent's bat gains the child's blocks; its footer takes the child's identity. */
  private async directoryIdentity(): Promise<void> {
    const parent = await VhdDirectory.open(this.parentPath);
    const child = await VhdDirectory.open(this.childPath);
    const bits = Buffer.alloc(Math.ceil(parent.header.maxTableEntries / 8));
    for (let b = 0; b < parent.blockCount; b++) {
      if (parent.isAllocated(b) || child.isAllocated(b)) setBit(bits, b);
    }
    await this.storage.put(key(this.parentKey, BAT_FILE), await compress(parent.compression, bits));
    await this.storage.put(key(this.parentKey, FOOTER_FILE), await compress(parent.compression, Buffer.from(this.journal.footer, 'base64')));
  }

  /** VHD files: the child's blocks are copied into the parent file (combined where partial). */
  private async fileBlocks(): Promise<void> {
    const parent = await VhdFile.open(this.parentPath, { writable: true });
    const child = await VhdFile.open(this.childPath);
    const parentIsDifferencing = parent.footer.diskType === 'differencing';
    try {
      // A resumed run must not leave the interrupted run's half-appended block as dead space.
      await parent.trimUnreferencedTail();
      for (let b = 0; b < child.blockCount; b++) {
        if (!child.isAllocated(b)) continue;
        const stored = (await child.readBlock(b))!;
        const whole = isBitmapFull(stored.bitmap, child.blockSize / SECTOR_SIZE);
        const merged = whole ? stored : overlay(await parent.readBlock(b), stored, child.blockSize, parentIsDifferencing);
        // No fsync per block: one at the end; a crash redoes this whole step from the journal.
        await parent.writeBlock(b, Buffer.from(merged.data), Buffer.from(merged.bitmap), { sync: false });
      }
      await parent.flush();
    } finally {
      await parent.close();
      await child.close();
    }
  }

  /** Both footer copies of the parent file become the merged result's footer. */
  private async fileIdentity(): Promise<void> {
    const footer = Buffer.from(this.journal.footer, 'base64');
    const fh = await open(this.parentPath, 'r+');
    try {
      const { size } = await fh.stat();
      await fh.write(footer, 0, FOOTER_SIZE, size - FOOTER_SIZE);
      await fh.write(footer, 0, FOOTER_SIZE, 0);
      await fh.sync();
    } finally {
      await fh.close();
    }
  }

  /**
   * The merged data takes the child's name: the child's data is moved aside
   * (not deleted) and the parent's data renamed in its place. Idempotent: once
   * the parent's name is gone, the swap is done.
   */
  private async swap(): Promise<void> {
    if (!(await this.storage.head(this.parentKey))) return;
    const trash = key(this.repo.diskKey(this.disk), trashName(this.repo.dataName(this.journal.child.id, this.journal.child.layout)));
    const ops: BatchOp[] = [];
    if (await this.storage.head(this.childKey)) ops.push({ rename: this.childKey, to: trash });
    ops.push({ rename: this.parentKey, to: this.childKey });
    await this.storage.batch(ops);
  }

  /** The child's metadata now describes the merged result; the parent's files go; the journal last. */
  private async metadata(): Promise<void> {
    const { parent, child } = this.journal;
    const merged: BackupMetadata = {
      ...child,
      kind: parent.kind,
      parent: parent.parent,
      wholeBlocks: parent.wholeBlocks === true && child.wholeBlocks === true,
      blocksWritten: child.blocksWritten,
      // An upper bound until reclaim() recounts (walking thousands of block files is not worth delaying the commit).
      bytesStored: parent.bytesStored + child.bytesStored,
    };
    await this.storage.batch([
      { put: this.repo.metadataKey(this.disk, child.id), data: `${JSON.stringify(merged, null, 2)}\n` },
      { delete: this.repo.metadataKey(this.disk, parent.id) },
      { delete: this.repo.digestsKey(this.disk, parent.id) },
      { delete: journalKey(this.repo, this.disk) },
    ]);
  }

  /** Free what the merge left aside (replaced blocks, the child's old data): after the commit, so never in its way. */
  async reclaim(): Promise<void> {
    const dir = this.repo.diskKey(this.disk);
    await this.storage.delete(key(dir, replacedName(this.journal.parent.id)));
    await this.storage.delete(key(dir, trashName(this.repo.dataName(this.journal.child.id, this.journal.child.layout))));
    await refreshStoredBytes(this.repo, this.journal.child);
  }
}

/**
 * Fold `child` into its parent `parent` (which is being removed): the result
 * holds the child's content under the child's id, UUID and timestamp, with the
 * parent's place in the chain (a full backup when the parent was full).
 * Call with the disk's lock held.
 */
export async function mergeForward(repo: Repository, parent: BackupMetadata, child: BackupMetadata, options: { reclaim?: boolean } = {}): Promise<void> {
  if (child.parent !== parent.id) throw new Error(`${child.id} is not a child of ${parent.id}`);
  if (parent.layout !== child.layout) throw new VaultError(repo.diskDir(child.disk), 'cannot merge backups of different layouts');
  if (parent.layout === 'objects') return mergeObjectsForward(repo, parent, child);
  const parentDisk: VhdDisk = parent.layout === 'dir' ? await VhdDirectory.open(repo.dataPath(parent.disk, parent.id, 'dir')) : await VhdFile.open(repo.dataPath(parent.disk, parent.id, 'vhd'));
  const childDisk: VhdDisk = child.layout === 'dir' ? await VhdDirectory.open(repo.dataPath(child.disk, child.id, 'dir')) : await VhdFile.open(repo.dataPath(child.disk, child.id, 'vhd'));
  await parentDisk.close();
  await childDisk.close();
  const footer = serializeFooter({ ...parentDisk.footer, uuid: childDisk.footer.uuid, timestamp: childDisk.footer.timestamp });
  const journal: MergeJournal = { format: 1, parent, child, footer: footer.toString('base64'), step: 'blocks' };
  await repo.writeJson(journalKey(repo, child.disk), journal);
  const merge = new Merge(repo, journal, false);
  await merge.run();
  if (options.reclaim ?? true) await merge.reclaim();
}

/** Recount what a backup occupies and record it (after a merge changed its files). */
async function refreshStoredBytes(repo: Repository, backup: BackupMetadata): Promise<void> {
  const meta = await repo.backup(backup.disk, backup.id);
  const bytesStored = await repo.storedBytes([repo.dataKey(meta.disk, meta.id, meta.layout), repo.digestsKey(meta.disk, meta.id)]);
  if (bytesStored !== meta.bytesStored) await repo.writeJson(repo.metadataKey(meta.disk, meta.id), { ...meta, bytesStored });
}

/**
 * Free the space a merge set aside, and recount the merged backup's size: what
 * reclaim() does (cleanLeftovers alone would also free it). Call with the lock held.
 */
export async function reclaimMergeSpace(repo: Repository, child: BackupMetadata): Promise<void> {
  await repo.cleanLeftovers(child.disk);
  await refreshStoredBytes(repo, child);
}

/** Finish a merge an interrupted run left behind, if any. Call with the disk's lock held. */
export async function completePendingMerge(repo: Repository, disk: string): Promise<boolean> {
  const path = repo.storage.describe(journalKey(repo, disk));
  let text: string;
  try {
    text = (await repo.storage.get(journalKey(repo, disk))).toString('utf8');
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
  let journal: MergeJournal;
  try {
    journal = JSON.parse(text) as MergeJournal;
  } catch {
    throw damaged('is damaged (not valid JSON)');
  }
  if (isObjectMergeJournal(journal)) {
    await completeObjectMerge(repo, disk, journal, damaged);
    return true;
  }
  const steps: Array<MergeJournal['step']> = ['blocks', 'identity', 'swap', 'metadata'];
  const sound =
    journal !== null &&
    typeof journal === 'object' &&
    journal.format === 1 &&
    journal.child?.disk === disk &&
    journal.parent?.disk === disk &&
    isBackupId(String(journal.parent?.id)) &&
    isBackupId(String(journal.child?.id)) &&
    journal.child.parent === journal.parent.id &&
    typeof journal.footer === 'string' &&
    steps.includes(journal.step);
  if (!sound) throw damaged('is damaged (not a merge journal of this disk)');
  const mismatch = await journalMismatch(repo, journal);
  if (mismatch) throw damaged(`does not match the disk (${mismatch}): it may be stale or copied from elsewhere`);
  const merge = new Merge(repo, journal, true);
  await merge.run();
  await merge.reclaim();
  return true;
}

/**
 * Does the disk look like the state the journal's step implies? A journal is
 * only ever resumed over the backups it was written for: before the metadata
 * step both are listed as parent and child; the data under the parent's name
 * carries the parent's UUID until the identity step gives it the child's; after
 * the swap the child's name holds the merged result (a disk of the parent's
 * kind). Returns what does not match, or null.
 */
async function journalMismatch(repo: Repository, journal: MergeJournal): Promise<string | null> {
  const { parent, child, step } = journal;
  const listed = async (id: string) => repo.backup(child.disk, id).catch(() => null);
  const uuidAt = async (k: string) => {
    if (!(await repo.storage.head(k))) return null;
    const disk = await openDisk(repo.path(k)).catch(() => null);
    await disk?.close();
    return disk ? { uuid: disk.footer.uuid, differencing: disk.footer.diskType === 'differencing' } : undefined;
  };
  const childMeta = await listed(child.id);
  if (!childMeta) return `backup ${child.id} is not listed`;
  let parentData = await uuidAt(repo.dataKey(child.disk, parent.id, parent.layout));
  const childData = await uuidAt(repo.dataKey(child.disk, child.id, child.layout));
  // A vhd-layout parent killed mid-append does not open until the resumed step trims it: its UUID cannot be read then.
  if (parentData === undefined && step === 'blocks' && parent.layout === 'vhd') parentData = { uuid: parent.uuid, differencing: parent.parent !== null };
  // Killed between the identity step's two footer writes, its copies differ: each must carry one of the two identities.
  if (parentData === undefined && step === 'identity' && parent.layout === 'vhd') {
    const uuids = await footerCopyUuids(repo.path(repo.dataKey(child.disk, parent.id, parent.layout)));
    if (uuids?.every((uuid) => uuid === parent.uuid || uuid === child.uuid)) parentData = { uuid: uuids[1]!, differencing: parent.parent !== null };
  }
  if (parentData === undefined || childData === undefined) return 'a backup named in it cannot be opened';
  if (step !== 'metadata') {
    if (!(await listed(parent.id)) || childMeta.parent !== parent.id) return `${child.id} is not listed as a child of ${parent.id}`;
  }
  if (step === 'blocks' || step === 'identity') {
    const allowed = step === 'blocks' ? [parent.uuid] : [parent.uuid, child.uuid];
    if (!parentData || !allowed.includes(parentData.uuid)) return `the data of ${parent.id} is not the one it names`;
    if (!childData || childData.uuid !== child.uuid) return `the data of ${child.id} is not the one it names`;
  } else if (parentData) {
    // swap not done yet: the parent's data already has the child's identity.
    if (parentData.uuid !== child.uuid) return `the data of ${parent.id} has not taken ${child.id}'s identity`;
  } else if (!childData || childData.uuid !== child.uuid || childData.differencing !== (parent.parent !== null)) {
    return `the data under ${child.id}'s name is not the merged result`;
  }
  return null;
}

/** The UUIDs of a VHD file's two footer copies (offset 0, end), or null when either does not parse. */
async function footerCopyUuids(path: string): Promise<[string, string] | null> {
  const fh = await open(path, 'r').catch(() => null);
  if (!fh) return null;
  try {
    const { size } = await fh.stat();
    const copy = async (at: number) => {
      const buf = Buffer.alloc(FOOTER_SIZE);
      await fh.read(buf, 0, FOOTER_SIZE, at);
      return parseFooter(buf, path).uuid;
    };
    return [await copy(0), await copy(size - FOOTER_SIZE)];
  } catch {
    return null;
  } finally {
    await fh.close();
  }
}

/** Is a merge journal present (a merge running, or abandoned by a killed run)? */
export function hasPendingMerge(repo: Repository, disk: string): Promise<boolean> {
  return repo.storage.head(journalKey(repo, disk)).then((x) => x !== null);
}

/**
 * For commands that only read, seeing an abandoned merge: take the disk's lock
 * just long enough to finish it. If a live process holds the lock, it finishes
 * the merge itself (every writer does first): wait a moment and let the caller look again.
 */
export async function settlePendingMerge(repo: Repository, disk: string): Promise<void> {
  try {
    await withDiskLock(repo, disk, 'merge recovery', () => withExclusiveAccess(repo, disk, 'merge recovery', () => completePendingMerge(repo, disk)));
  } catch (err) {
    if (!(err instanceof LockBusyError)) throw err;
    await sleep(100);
  }
}

/** Run `fn` as a reader of `disk` (see access.ts), finishing an abandoned merge first. */
export function readingDisk<T>(repo: Repository, disk: string, command: string, fn: () => Promise<T>, onWait?: (message: string) => void): Promise<T> {
  return withReadAccess(repo, disk, command, fn, {
    onWait,
    recover: { pending: () => hasPendingMerge(repo, disk), settle: () => settlePendingMerge(repo, disk) },
  });
}
