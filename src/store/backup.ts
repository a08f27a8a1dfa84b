import { readFile } from 'node:fs/promises';
import { NbdSource } from '../nbd/NbdSource.js';
import { isNbdUri, type NbdAddress, parseNbdUri } from '../nbd/uri.js';
import { UsageError, VaultError } from '../util/errors.js';
import { cleanUpAfter } from '../util/fsync.js';
import { ForeignImageError, openSource, type BlockSource } from '../vhd/source.js';
import { openImageThroughQemuNbd } from '../nbd/imageServer.js';
import { newUuid } from '../vhd/uuid.js';
import { BackupPipeline } from './backupPipeline.js';
import { openDigests } from './chain.js';
import type { Digests } from './layouts/Layout.js';
import { type DiskLock, withDiskLock } from './lock.js';
import { withExclusiveAccess } from './access.js';
import { lineageFindings } from './inspect.js';
import { completePendingMerge, hasPendingMerge } from './merge.js';
import { isNoSpace } from './reserve.js';
import { newBackupId } from './names.js';
import { type BlockPool, defaultConcurrency } from './pool.js';
import type { BackupMetadata, Checkpoint, Repository } from './repository.js';
import { newBackupMetadata } from './repository.js';
import { slowest, type Stage, type StageFigures } from './stages.js';
import { type Limiter, limiter } from './throttle.js';

export interface BackupOptions {
  source: string;
  /** Read the source as a raw image even if its name says VHD. */
  fromRaw?: boolean;
  full?: boolean;
  /** A file of one bit per block (MSB first): only blocks whose bit is 1 are read. */
  changed?: string;
  /** With an NBD source: the qemu dirty bitmap whose dirty blocks are the delta's changed blocks (also `?bitmap=` in the URI). */
  bitmap?: string;
  concurrency?: number;
  maxRead?: number;
  maxWrite?: number;
  onProgress?: (doneBlocks: number, totalBlocks: number, bytesRead: number) => void;
  /** Stops the backup: its staged files are removed, and the signal's reason is thrown. */
  signal?: AbortSignal;
}

export interface BackupReport {
  id: string;
  kind: 'full' | 'delta';
  parent: string | null;
  size: number;
  blocksRead: number;
  blocksWritten: number;
  bytesWritten: number;
  /** Bytes read from the source: for NBD, what came as data (holes are skipped); for a file, the blocks read that held data. */
  bytesRead: number;
  /** Data extents read from an NBD source; null for a file. */
  extents: number | null;
  /** The dirty bitmap the delta was built from, or null. */
  bitmap: string | null;
  durationMs: number;
  stages: Record<Stage, StageFigures>;
  boundingStage: Stage;
  /** Why a delta was not possible, when the backup is full although not asked to be. */
  note?: string;
}

/** Read a changed-block bitmap, which must cover every block. */
async function readChangedBitmap(path: string, blockCount: number): Promise<Buffer> {
  const bits = await readFile(path).catch((err: unknown) => {
    throw new VaultError(path, `cannot read changed-block bitmap: ${(err as Error).message}`);
  });
  const needed = Math.ceil(blockCount / 8);
  if (bits.length < needed) throw new VaultError(path, `changed-block bitmap has ${bits.length} bytes, ${needed} needed for ${blockCount} blocks`);
  return bits;
}

/** Where a backup reads: a file (openSource) or an NBD export, with the dirty bitmap a delta may come from. */
interface SourcePlan {
  nbd: NbdAddress | null;
  bitmap: string | null;
}

/** Usage errors about the source, found before any work (the CLI calls it before opening the repository). */
export function planSource(options: BackupOptions): SourcePlan {
  // Another URI scheme would otherwise be opened as a file name and fail as a missing file.
  const scheme = /^([a-z][a-z0-9+.-]*):\/\//i.exec(options.source)?.[1];
  if (scheme !== undefined && !isNbdUri(options.source)) {
    throw new UsageError(`--source ${options.source}: vhdvault does not read ${scheme}:// sources; give a file or device path, or an NBD URI (nbd://host[:port]/export, nbd+unix:///export?socket=/path)`);
  }
  if (!isNbdUri(options.source)) {
    if (options.bitmap !== undefined) throw new UsageError('--bitmap needs an NBD source (--source nbd://… or nbd+unix://…)');
    return { nbd: null, bitmap: null };
  }
  const nbd = parseNbdUri(options.source);
  if (options.bitmap === '') throw new UsageError('--bitmap names no bitmap');
  if (options.bitmap !== undefined && nbd.bitmap !== null && options.bitmap !== nbd.bitmap) {
    throw new UsageError(`--bitmap ${options.bitmap} and the source's bitmap=${nbd.bitmap} differ: give one`);
  }
  const bitmap = options.bitmap ?? nbd.bitmap;
  if (bitmap !== null && options.changed) throw new UsageError('--changed and a dirty bitmap both say which blocks changed: give one');
  return { nbd, bitmap };
}

/**
 * Take a backup of `source` as the next backup of `disk`. Blocks are read in
 * order (ahead of the workers), digested, compared with the previous backup's
 * digests, and only changed ones are stored. Data and digests are written under
 * temporary names; the metadata file, written last, is what makes the backup exist.
 */
export async function backup(repo: Repository, disk: string, options: BackupOptions): Promise<BackupReport> {
  const plan = planSource(options);
  return withBackupLock(repo, disk, async (lock) => {
    // A bitmap the export lacks is refused here, even for a full backup: the set-up is wrong either way.
    const source = plan.nbd ? await NbdSource.open(plan.nbd, { bitmap: plan.bitmap }) : await openFileSource(options.source, options.fromRaw);
    try {
      return await backupFrom(repo, disk, source, options, plan.bitmap, { lock });
    } finally {
      await source.close();
    }
  });
}

/** A file: a raw image or VHD as it is; an image in another format (qcow2, …) through a qemu-nbd started for this backup. */
async function openFileSource(path: string, fromRaw: boolean | undefined): Promise<BlockSource> {
  try {
    return await openSource(path, { fromRaw, fromRawFlag: '--from raw' });
  } catch (err) {
    if (!(err instanceof ForeignImageError)) throw err;
    return openImageThroughQemuNbd(err.file, err.format);
  }
}

/**
 * Run `fn` holding the disk's backup lock, once a pending merge, commits and
 * leftovers of interrupted runs are dealt with: what every backup of `disk`
 * (from a file, NBD, or a live QEMU disk) runs under.
 */
export async function withBackupLock<T>(repo: Repository, disk: string, fn: (lock: DiskLock) => Promise<T>): Promise<T> {
  const diskDir = repo.diskDir(disk);
  // The lock, created first, makes the disk's folder.
  try {
    return await withDiskLock(repo, disk, 'backup', async (lock) => {
      if (await hasPendingMerge(repo, disk)) await withExclusiveAccess(repo, disk, lock, () => completePendingMerge(repo, disk));
      await repo.recoverCommits(disk);
      await repo.cleanLeftovers(disk);
      return await fn(lock);
    });
  } catch (err) {
    // Staged files are gone (the writers' abort): say where space ran out, and that nothing changed.
    if (isNoSpace(err)) throw new VaultError(diskDir, 'no space left on device while writing the backup; nothing was committed and earlier backups are unchanged (free space, or run prune, then try again)');
    throw err;
  }
}

/** What a live backup decides before the pipeline runs. */
export interface BackupExtras {
  /** The new backup's id (a live backup names its checkpoint after it before reading). */
  id?: string;
  /** Why a delta is not built from a dirty bitmap, when it could have been. */
  note?: string;
  /** Recorded in the new backup's metadata. */
  checkpoint?: Checkpoint;
  /** The --max-write pace, when something else writes to the backup target too (direct mode's copies). */
  writeLimit?: Limiter;
  /** The disk's lock, confirmed still ours right before the commit. */
  lock?: DiskLock;
  /** Worker threads shared by the disks of a VM backup (see BackupPipeline). */
  pool?: BlockPool;
  /** Told each block, in order, once the new backup holds it (or needs nothing of the source's): see PipelineInput. */
  onSettled?: (block: number) => void;
}

/**
 * The backup a new delta may build on: the latest, if its chain is sound. A
 * delta over a broken chain could never be restored, so the backup is full
 * instead and says why.
 */
async function deltaBase(repo: Repository, latest: BackupMetadata | undefined): Promise<{ parent: BackupMetadata | null; note?: string }> {
  if (!latest) return { parent: null };
  // The same structure check prune runs, over the chain the delta would extend.
  const findings = await lineageFindings(repo, latest);
  if (findings.length === 0) return { parent: latest };
  const first = findings[0]!;
  const more = findings.length > 1 ? ` (and ${findings.length - 1} more)` : '';
  return { parent: null, note: `the latest backup's chain cannot be built on (backup ${first.id}: ${first.problem}${more}): taking a full backup; run vhdvault verify` };
}

/** What a backup decides before any block is read: its id, its parent, why not a delta, and which blocks changed. */
interface BackupPlan {
  id: string;
  parent: BackupMetadata | null;
  note: string | undefined;
  changed: Buffer | null;
}

async function planBackup(repo: Repository, disk: string, source: BlockSource, options: BackupOptions, bitmap: string | null, extras: BackupExtras): Promise<BackupPlan> {
  const { blockSize } = repo.config;
  if (source.blockSize !== blockSize) {
    throw new VaultError(options.source, `has ${source.blockSize}-byte blocks; backups use ${blockSize}-byte blocks (convert it first)`);
  }
  const latest = await repo.latest(disk);
  // A disk's first backup in a repository said to be plain: the others' metadata must not be sealed.
  if (!latest) await repo.refuseIfSealedElsewhere();
  const base = options.full ? { parent: null } : await deltaBase(repo, latest);
  let parent = base.parent;
  let note = base.note ?? extras.note;
  if (parent && parent.size !== source.size) {
    note = `disk size changed (${parent.size} → ${source.size} bytes): taking a full backup`;
    parent = null;
  }
  if (options.changed && !parent) note ??= 'no previous backup to compare with: --changed ignored, every block read';
  if (bitmap !== null && !parent) {
    const why = note ?? (options.full ? '--full' : 'no previous backup to build on');
    note = `${why}; dirty bitmap "${bitmap}" not used: every allocated block read`;
  }
  // Before anything is staged: a bitmap that cannot be read leaves nothing to clean up.
  let changed: Buffer | null = null;
  if (parent && options.changed) changed = await readChangedBitmap(options.changed, source.blockCount);
  // The bitmap says what changed since the previous backup: its dirty blocks are all this delta reads.
  if (parent && bitmap !== null && source instanceof NbdSource) changed = await source.dirtyBlocks(bitmap);
  return { id: extras.id ?? newBackupId(latest?.id), parent, note, changed };
}

/** The backup pipeline over an open source; call it under withBackupLock. */
export async function backupFrom(repo: Repository, disk: string, source: BlockSource, options: BackupOptions, bitmap: string | null, extras: BackupExtras = {}): Promise<BackupReport> {
  const started = performance.now();
  const { id, parent, note, changed } = await planBackup(repo, disk, source, options, bitmap, extras);
  const { size, blockCount } = source;
  const uuid = newUuid();
  const previous: Digests | null = parent ? await openDigests(repo, parent) : null;
  // Aborted when the backup fails or is stopped: blocks waiting for their turn under a rate limit give up at once.
  const failed = new AbortController();
  const stop = () => failed.abort();
  options.signal?.addEventListener('abort', stop, { once: true });
  if (options.signal?.aborted) failed.abort();
  let result;
  try {
    const writer = await repo.layout.createWriter(repo, { disk, id, size, blockCount, uuid, parent, previous });
    try {
      result = await BackupPipeline.run({
        source,
        writer,
        previous,
        digester: repo.digester,
        changed,
        concurrency: Math.max(1, options.concurrency ?? defaultConcurrency()),
        readLimit: limiter(options.maxRead),
        writeLimit: extras.writeLimit ?? limiter(options.maxWrite),
        paced: options.maxWrite !== undefined,
        onProgress: options.onProgress,
        signal: failed.signal,
        pool: extras.pool,
        onSettled: extras.onSettled,
      });
      await writer.finish(result.digests.bytes);
    } catch (err) {
      failed.abort();
      throw await cleanUpAfter(err, () => writer.abort());
    }
    const fields = { disk, id, parent: parent?.id ?? null, size, blockCount, uuid, blocksWritten: result.blocksWritten, bytesWritten: result.bytesWritten };
    const metadata = newBackupMetadata(repo, { ...fields, bytesStored: await writer.storedBytes(result.bytesWritten), ...(extras.checkpoint ? { checkpoint: extras.checkpoint } : {}) }, result.digests.bytes);
    await extras.lock?.confirm();
    await repo.commitBackup(metadata, result.digests.bytes);
  } catch (err) {
    throw options.signal?.aborted ? options.signal.reason : err;
  } finally {
    options.signal?.removeEventListener('abort', stop);
    await previous?.close();
  }
  return {
    id,
    kind: parent ? 'delta' : 'full',
    parent: parent?.id ?? null,
    size,
    blocksRead: result.blocksRead,
    blocksWritten: result.blocksWritten,
    bytesWritten: result.bytesWritten,
    bytesRead: source instanceof NbdSource ? source.bytesRead : result.fileBytesRead,
    extents: source instanceof NbdSource ? source.extents : null,
    bitmap: parent && bitmap !== null ? bitmap : null,
    durationMs: Math.round(performance.now() - started),
    stages: result.stages,
    boundingStage: slowest(result.stages),
    ...(note ? { note } : {}),
  };
}
