import { setMaxListeners } from 'node:events';
import { readFile } from 'node:fs/promises';
import pLimit from 'p-limit';
import { NbdSource } from '../nbd/NbdSource.js';
import { isNbdUri, type NbdAddress, parseNbdUri } from '../nbd/uri.js';
import { testBit } from '../vhd/bitmap.js';
import { UsageError, VaultError } from '../util/errors.js';
import { openDisk } from '../vhd/openDisk.js';
import { openSource, type BlockSource } from '../vhd/source.js';
import { VhdDirectoryWriter } from '../vhd/VhdDirectory.js';
import { DynamicVhdWriter, type ParentLink } from '../vhd/VhdWriter.js';
import { newUuid } from '../vhd/uuid.js';
import { BLOCK_READ_AHEAD, orderedReadAhead, range } from '../util/pipeline.js';
import { releaseBuffer } from '../util/bufferPool.js';
import { DigestWriter, zeroDigest } from './digests.js';
import { BlockMapWriter, blockObjectKey, sweepMarkerKey } from './blockObjects.js';
import { openDigests } from './chain.js';
import { withDiskLock } from './lock.js';
import { withExclusiveAccess } from './access.js';
import { lineageFindings } from './inspect.js';
import { completePendingMerge, hasPendingMerge } from './merge.js';
import { isNoSpace } from './reserve.js';
import { newBackupId } from './names.js';
import { BlockPool, defaultConcurrency } from './pool.js';
import type { BackupMetadata, Checkpoint, Repository } from './repository.js';
import { newBackupMetadata } from './repository.js';
import { BusyClock, figures, slowest, type Stage, type StageFigures } from './stages.js';
import { type Limiter, limiter } from './throttle.js';

const SOURCE_READS_IN_FLIGHT = 4;

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
  slowestStage: Stage;
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
  return withBackupLock(repo, disk, async () => {
    // A bitmap the export lacks is refused here, even for a full backup: the set-up is wrong either way.
    const source = plan.nbd ? await NbdSource.open(plan.nbd, { bitmap: plan.bitmap }) : await openSource(options.source, { fromRaw: options.fromRaw });
    try {
      return await backupFrom(repo, disk, source, options, plan.bitmap);
    } finally {
      await source.close();
    }
  });
}

/**
 * Run `fn` holding the disk's backup lock, once a pending merge, commits and
 * leftovers of interrupted runs are dealt with: what every backup of `disk`
 * (from a file, NBD, or a live QEMU disk) runs under.
 */
export async function withBackupLock<T>(repo: Repository, disk: string, fn: () => Promise<T>): Promise<T> {
  const diskDir = repo.diskDir(disk);
  // The lock, created first, makes the disk's folder.
  try {
    return await withDiskLock(repo, disk, 'backup', async () => {
      if (await hasPendingMerge(repo, disk)) await withExclusiveAccess(repo, disk, 'backup', () => completePendingMerge(repo, disk));
      await repo.recoverCommits(disk);
      await repo.cleanLeftovers(disk);
      return await fn();
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

/** The backup pipeline over an open source; call it under withBackupLock. */
export async function backupFrom(repo: Repository, disk: string, source: BlockSource, options: BackupOptions, bitmap: string | null, extras: BackupExtras = {}): Promise<BackupReport> {
  const started = performance.now();
  const { layout, compression, blockSize } = repo.config;
  if (source.blockSize !== blockSize) {
    throw new VaultError(options.source, `has ${source.blockSize}-byte blocks; backups use ${blockSize}-byte blocks (convert it first)`);
  }
  const { size, blockCount } = source;
  const latest = await repo.latest(disk);
  const base = options.full ? { parent: null } : await deltaBase(repo, latest);
  let parent = base.parent;
  let note = base.note ?? extras.note;
  if (parent && parent.size !== size) {
    note = `disk size changed (${parent.size} → ${size} bytes): taking a full backup`;
    parent = null;
  }
  if (options.changed && !parent) note ??= 'no previous backup to compare with: --changed ignored, every block read';
  if (bitmap !== null && !parent) {
    const why = note ?? (options.full ? '--full' : 'no previous backup to build on');
    note = `${why}; dirty bitmap "${bitmap}" not used: every allocated block read`;
  }

  const id = extras.id ?? newBackupId(latest?.id);
  const uuid = newUuid();
  let link: ParentLink | undefined;
  const objects = layout === 'objects';
  if (parent && !objects) {
    const parentDisk = await openDisk(repo.dataPath(disk, parent.id, parent.layout));
    await parentDisk.close();
    // Relative locators only: a moved or copied repository must never reach back into the original.
    link = { uuid: parentDisk.footer.uuid, timestamp: parentDisk.footer.timestamp, relativePath: repo.dataName(parent.id, parent.layout) };
  }
  // Before anything is staged: a bitmap that cannot be read leaves nothing to clean up.
  let changed: Buffer | null = null;
  if (parent && options.changed) changed = await readChangedBitmap(options.changed, blockCount);
  // The bitmap says what changed since the previous backup: its dirty blocks are all this delta reads.
  if (parent && bitmap !== null && source instanceof NbdSource) changed = await source.dirtyBlocks(bitmap);
  const writerOptions = { size, blockSize, parent: link, uuid };
  // The objects layout has no VHD to write: block objects, then a block map (§4.15).
  const writer = objects ? null : layout === 'dir' ? await VhdDirectoryWriter.create(repo.stagedDataPath(disk, id), { ...writerOptions, compression }) : await DynamicVhdWriter.create(repo.stagedDataPath(disk, id), writerOptions);
  const digests = objects ? new BlockMapWriter(blockCount) : await DigestWriter.create(repo.stagedDigestsPath(disk, id));
  // Objects layout: until the commit names them, uploaded objects are garbage only a sweep could find: say so first.
  if (objects) await repo.storage.put(sweepMarkerKey(repo, disk, id), '');
  const previous = parent ? await openDigests(repo, parent) : null;
  // Objects already in the store that this backup may name without uploading: the parent's, and its own as it goes.
  const present = new Set<string>();
  if (objects && previous) for (let b = 0; b < blockCount; b++) present.add((await previous.get(b)).toString('hex'));
  const concurrency = Math.max(1, options.concurrency ?? defaultConcurrency());
  const pool = await BlockPool.create(concurrency);
  const readLimit = limiter(options.maxRead);
  // Source reads in flight at once: enough to keep storage busy, few enough not to thrash a disk
  // (the pipeline around them holds more blocks, waiting for workers).
  const readSlots = pLimit(SOURCE_READS_IN_FLIGHT);
  const writeLimit = extras.writeLimit ?? limiter(options.maxWrite);
  // Aborted when the backup fails: blocks waiting for their turn under a rate limit give up at once.
  const failed = new AbortController();
  setMaxListeners(0, failed.signal); // one per block waiting its turn: up to the read-ahead, by design
  const stop = () => failed.abort();
  options.signal?.addEventListener('abort', stop, { once: true });
  if (options.signal?.aborted) failed.abort();
  const clocks = { read: new BusyClock(), write: new BusyClock() };
  const workerMs = { digest: 0, compress: 0, write: 0 };
  let blocksRead = 0;
  let blocksWritten = 0;
  let bytesWritten = 0;
  let bytesCompressed = 0;
  let fileBytesRead = 0;
  const zero = zeroDigest(blockSize);

  /** Read, digest and (dir layout) store one block; resolves to what the in-order consumer needs. */
  const produce = async (block: number) => {
    const prev = previous ? await previous.get(block) : null;
    if (changed && prev && !testBit(changed, block)) return { digest: prev, store: false, data: null, storedBytes: 0 };
    let data = await readSlots(async () => {
      await readLimit.take(blockSize, failed.signal);
      return clocks.read.time(() => source.readBlock(block));
    });
    blocksRead++;
    clocks.read.bytes += blockSize;
    if (data !== null) fileBytesRead += Math.min(blockSize, size - block * blockSize); // (an NbdSource counts its own)
    if (data === null) {
      // Known zero (unallocated in a VHD source): stored only to hide older data.
      if (prev === null || prev.equals(zero)) return { digest: zero, store: false, data: null, storedBytes: 0 };
      data = Buffer.alloc(blockSize);
    }
    const target = writer instanceof VhdDirectoryWriter ? { storage: repo.storage.descriptor, key: repo.keyOfPath(await writer.externalBlockFile(block)) } : objects ? { storage: repo.storage.descriptor, key: '' } : null;
    const result = await pool.run({
      block,
      data: data.buffer as ArrayBuffer,
      byteOffset: data.byteOffset,
      length: data.length,
      previousDigest: prev,
      compression,
      bare: objects,
      target,
      // Under a write limit the file is written only once the limiter lets its bytes through;
      // a block object only once its name (its digest) says it is not in the store already.
      deferWrite: objects || (target !== null && options.maxWrite !== undefined),
    });
    workerMs.digest += result.digestMs;
    workerMs.compress += result.compressMs;
    workerMs.write += result.writeMs;
    if (objects && result.store) {
      const hex = Buffer.from(result.digest).toString('hex');
      // Zeros need no object, and an object already there is named, not sent again.
      result.store = !Buffer.from(result.digest).equals(zero) && !present.has(hex);
      present.add(hex);
      if (!result.store) result.prepared = undefined;
    }
    if (result.store) await writeLimit.take(result.storedBytes, failed.signal);
    if (result.prepared) {
      const at = objects ? { storage: repo.storage.descriptor, key: blockObjectKey(repo, disk, result.digest), whole: true } : target!;
      workerMs.write += await pool.write({ target: at, parts: result.prepared });
    }
    const keep = result.store && writer instanceof DynamicVhdWriter; // the main thread still has to append it
    if (!keep) releaseBuffer(result.data);
    return { digest: Buffer.from(result.digest), store: result.store, data: keep ? Buffer.from(result.data.buffer, result.data.byteOffset, result.data.length) : null, storedBytes: result.storedBytes };
  };

  // Two blocks per worker keep them all busy; at most 64 blocks (128 MiB) in flight whatever --concurrency.
  const readAhead = Math.min(64, Math.max(BLOCK_READ_AHEAD, concurrency * 2));
  try {
    let done = 0;
    for await (const [block, r] of orderedReadAhead(range(blockCount), readAhead, produce)) {
      await digests.append(r.digest);
      if (r.store) {
        blocksWritten++;
        bytesWritten += r.storedBytes;
        if (writer instanceof DynamicVhdWriter) {
          await clocks.write.time(() => writer.writeBlock(block, r.data!));
          releaseBuffer(r.data!);
        } else {
          writer?.adoptBlock(block);
          bytesCompressed += blockSize;
        }
      }
      options.onProgress?.(++done, blockCount, clocks.read.bytes);
    }
    await writer?.finish();
    await digests.finish();
  } catch (err) {
    failed.abort();
    await writer?.abort();
    await digests.abort();
    throw options.signal?.aborted ? options.signal.reason : err;
  } finally {
    options.signal?.removeEventListener('abort', stop);
    await previous?.close();
    await pool.close();
  }

  const metadata = await newBackupMetadata(repo, { disk, id, parent: parent?.id ?? null, size, blockCount, uuid, blocksWritten, bytesWritten, ...(extras.checkpoint ? { checkpoint: extras.checkpoint } : {}) });
  await repo.commitBackup(metadata, digests instanceof BlockMapWriter ? digests.map : undefined);

  const threads = concurrency;
  const stages: Record<Stage, StageFigures> = {
    read: figures(clocks.read.bytes, clocks.read.busyMs),
    digest: figures(blocksRead * blockSize, workerMs.digest / threads),
    compress: figures(compression === 'none' ? 0 : bytesCompressed, workerMs.compress / threads),
    write: figures(bytesWritten, layout === 'vhd' ? clocks.write.busyMs : workerMs.write / threads),
  };
  return {
    id,
    kind: metadata.kind,
    parent: metadata.parent,
    size,
    blocksRead,
    blocksWritten,
    bytesWritten,
    bytesRead: source instanceof NbdSource ? source.bytesRead : fileBytesRead,
    extents: source instanceof NbdSource ? source.extents : null,
    bitmap: parent && bitmap !== null ? bitmap : null,
    durationMs: Math.round(performance.now() - started),
    stages,
    slowestStage: slowest(stages),
    ...(note ? { note } : {}),
  };
}
