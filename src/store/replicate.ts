/**
 * Replication to a second repository (docs/design/04-repository.md §4.14): each backup of the
 * source the destination lacks is sent as what it stores — a delta's blocks
 * over the same parent at the destination — under the destination's own
 * commit protocol, with the source's id, UUID and creation time. A backup
 * whose parent the destination lacks (or no backup in common at all) is
 * sent as a full synthesized from its chain, and the report says why.
 */
import { realpath } from 'node:fs/promises';
import { bitmapByteSize, fullBitmap, isBitmapFull } from '../vhd/bitmap.js';
import { type Compression, compress, decompress } from '../vhd/compression.js';
import { SECTOR_SIZE } from '../vhd/constants.js';
import type { VhdDisk } from '../vhd/disk.js';
import { UsageError, VaultError } from '../util/errors.js';
import { cleanUpAfter } from '../util/fsync.js';
import { blocksWithData } from '../vhd/synthesize.js';
import { orderedReadAhead, range } from '../util/pipeline.js';
import { isAllZero } from '../util/zero.js';
import { withBackupLock } from './backup.js';
import { openBackupChain, openBackupData, verifiedChain } from './chain.js';
import { checkDigestsBinding, DIGEST_SIZE } from './digests.js';
import { lineageFindings } from './inspect.js';
import { describeFinding } from './list.js';
import { readingDisk } from './merge.js';
import { checkDiskName } from './names.js';
import { prune } from './prune.js';
import { vmDiskName, vmNames, vmRecords, writeVmRecord } from './vmRecord.js';
import { pinReplica, readReplicaPin } from './replicaPins.js';
import type { BackupWriter } from './layouts/Layout.js';
import { type BackupMetadata, newBackupMetadata, type Repository } from './repository.js';
import type { RetentionPolicy } from './retention.js';
import { BusyClock, figures, type StageFigures } from './stages.js';
import { type Limiter, limiter } from './throttle.js';

/** Source blocks read (and checked) ahead of the destination's writes. */
const READ_AHEAD = 8;

export interface ReplicateOptions {
  /** The destination's retention, applied to each disk after its copies. */
  retention?: RetentionPolicy;
  /** Per disk: blocks sent of those to send, and bytes written at the destination so far. */
  onProgress?: (disk: string, doneBlocks: number, totalBlocks: number, bytesSent: number) => void;
  /** Bytes per second written at the destination. */
  maxWrite?: number;
  /** Told once when a prune or reader keeps us waiting. */
  onWait?: (message: string) => void;
  /** Warnings of the destination's prune (backups it keeps although its policy removes them). */
  onWarning?: (message: string) => void;
}

export interface CopiedBackup {
  id: string;
  /** What the destination now holds: the delta as the source stores it, or a full backup. */
  how: 'delta' | 'full';
  /** Why a full: the destination lacked the delta's parent, or held no backup in common. */
  reason?: string;
  blocks: number;
  /** Bytes written at the destination: data and digests. */
  bytesSent: number;
}

export interface DiskReplication {
  disk: string;
  copied: CopiedBackup[];
  /** Source backups the destination already held. */
  skipped: string[];
  /** Backups the destination's retention removed. */
  pruned: string[];
  /** The newest backup both repositories hold now: what the source's pin keeps. */
  common: string | null;
  /** Why this disk failed (the other disks went on). */
  error?: string;
  durationMs: number;
}

export type ReplicationStage = 'read' | 'write';

export interface ReplicationReport {
  source: string;
  destination: string;
  disks: DiskReplication[];
  /** VM backups (vmRecord.ts) now whole at the destination and recorded there, as `<vm> <id>`. */
  vmBackups: string[];
  totals: { disks: number; failed: number; copied: number; full: number; bytesSent: number; pruned: number };
  /** read: the source's blocks read and checked against their digests; write: the destination's writes and commits. */
  stages: Record<ReplicationStage, StageFigures>;
  boundingStage: ReplicationStage;
  durationMs: number;
}

/** One replication run: both repositories and what is measured across disks. */
interface Run {
  src: Repository;
  dst: Repository;
  /** The destination's real path: what the source's pins name. */
  destination: string;
  options: ReplicateOptions;
  read: BusyClock;
  write: BusyClock;
  writeLimit: Limiter;
}

/** A backup to send: its source metadata, and the destination backup it will be a delta of (null: a full). */
interface Step {
  meta: BackupMetadata;
  parent: string | null;
  reason?: string;
  blocks: number;
}

/**
 * Copy to `dst` the backups of `src` it lacks, for the given disks (default:
 * every disk of the source), then apply the destination's retention. One
 * disk's failure is reported in its entry and never stops the others.
 */
export async function replicate(src: Repository, dst: Repository, disks: string[] | undefined, options: ReplicateOptions = {}): Promise<ReplicationReport> {
  const started = performance.now();
  for (const disk of disks ?? []) checkDiskName(disk);
  for (const repo of [src, dst]) if (!repo.storage.capabilities.localFiles) throw new VaultError(repo.root, 'replication reads and writes VHD data in repository folders; it does not handle an object store yet');
  const destination = await realpath(dst.root);
  if ((await realpath(src.root)) === destination) throw new UsageError(`${dst.root} is the source repository itself: replicate to another repository`);
  const run: Run = { src, dst, destination, options, read: new BusyClock(), write: new BusyClock(), writeLimit: limiter(options.maxWrite) };
  const results: DiskReplication[] = [];
  const chosen = disks ?? (await src.disks());
  // VM backups whose disks the destination already holds first: its retention then keeps or removes them whole.
  const vmBackups = await copyVmRecords(run, chosen);
  for (const disk of chosen) results.push(await replicateDisk(run, disk));
  vmBackups.push(...(await copyVmRecords(run, chosen)));
  const stages = { read: figures(run.read.bytes, run.read.busyMs), write: figures(run.write.bytes, run.write.busyMs) };
  const copied = results.flatMap((r) => r.copied);
  return {
    source: src.root,
    destination: dst.root,
    disks: results,
    vmBackups,
    totals: {
      disks: results.length,
      failed: results.filter((r) => r.error !== undefined).length,
      copied: copied.length,
      full: copied.filter((c) => c.how === 'full').length,
      bytesSent: copied.reduce((n, c) => n + c.bytesSent, 0),
      pruned: results.reduce((n, r) => n + r.pruned.length, 0),
    },
    stages,
    boundingStage: stages.write.busyMs >= stages.read.busyMs ? 'write' : 'read',
    durationMs: Math.round(performance.now() - started),
  };
}

/**
 * Copy the records of the source's VM backups (vmRecord.ts) whose disks are
 * all among `disks` and whose every disk backup the destination now holds,
 * unless it has them: a VM backup exists at the destination only whole.
 * Returns what was copied, as `<vm> <id>`.
 */
async function copyVmRecords(run: Run, disks: string[]): Promise<string[]> {
  const copied: string[] = [];
  const chosen = new Set(disks);
  for (const vm of await vmNames(run.src)) {
    const have = new Set((await vmRecords(run.dst, vm)).map((r) => r.id));
    for (const record of await vmRecords(run.src, vm)) {
      if (have.has(record.id)) continue;
      const parts = Object.entries(record.disks).map(([target, id]) => ({ disk: vmDiskName(vm, target), id }));
      if (!parts.every((p) => chosen.has(p.disk))) continue;
      const held = await Promise.all(parts.map(async (p) => (await run.dst.storage.head(run.dst.metadataKey(p.disk, p.id))) !== null));
      if (!held.every(Boolean)) continue;
      await writeVmRecord(run.dst, record);
      copied.push(`${vm} ${record.id}`);
    }
  }
  return copied;
}

/** A problem with one disk (a file, a lock, a damaged backup) rather than a reason to stop everything (an interrupt). */
function isDiskFailure(err: unknown): err is Error {
  return err instanceof VaultError || typeof (err as NodeJS.ErrnoException)?.code === 'string';
}

async function replicateDisk(run: Run, disk: string): Promise<DiskReplication> {
  const started = performance.now();
  const result: DiskReplication = { disk, copied: [], skipped: [], pruned: [], common: null, durationMs: 0 };
  // A reader of the source until the pin names what the destination now holds: the source's prune waits, then plans with it.
  const sendAndPin = async (send: boolean) => {
    let failure: unknown = null;
    try {
      if (send) await withBackupLock(run.dst, disk, () => sendMissing(run, disk, result));
    } catch (err) {
      failure = err;
    }
    // What was committed before a failure is held by both sides too: the pin follows it.
    try {
      result.common = await pinCommon(run, disk);
    } catch (err) {
      failure ??= err;
    }
    if (failure !== null) throw failure;
  };
  try {
    await run.src.requireDisk(disk);
    await readingDisk(run.src, disk, 'replicate', () => sendAndPin(true), run.options.onWait);
    // Not as a reader of the source: a replication the other way, pruning this source, would wait for us as we wait for it.
    if (run.options.retention && (await run.dst.latest(disk))) {
      await applyRetention(run, disk, run.options.retention, result);
      // The destination keeps its newest backup, the one in common, unless it holds newer ones of its own.
      if (result.common !== null && result.pruned.includes(result.common)) await readingDisk(run.src, disk, 'replicate', () => sendAndPin(false), run.options.onWait);
    }
  } catch (err) {
    if (!isDiskFailure(err)) throw err;
    result.error = err.message;
  }
  result.durationMs = Math.round(performance.now() - started);
  return result;
}

/**
 * Same backup on both sides: same id (the caller's), same VHD UUID and the
 * same digests, i.e. the same disk content. Between repositories that digest
 * differently (either is encrypted), digests cannot be compared: the UUID,
 * drawn at random for each backup and carried by its copies, says it alone.
 */
async function sameBackup(run: Run, source: BackupMetadata, copy: BackupMetadata): Promise<boolean> {
  if (source.uuid !== copy.uuid || source.size !== copy.size || source.blockCount !== copy.blockCount) return false;
  if (!sameDigests(run)) return true;
  const [a, b] = await Promise.all([run.src.storage.get(run.src.digestsKey(source.disk, source.id)), run.dst.storage.get(run.dst.digestsKey(copy.disk, copy.id))]);
  return a.equals(b);
}

/** The newest source backup the destination holds as the same backup. */
async function newestCommon(run: Run, sourceBackups: BackupMetadata[], held: Map<string, BackupMetadata>): Promise<BackupMetadata | null> {
  for (const s of [...sourceBackups].reverse()) {
    const copy = held.get(s.id);
    if (copy && (await sameBackup(run, s, copy))) return s;
  }
  return null;
}

/** Why the destination gets a full copy when it shares no backup with the source. */
async function noCommonReason(run: Run, disk: string, held: BackupMetadata[]): Promise<string> {
  const pin = await readReplicaPin(run.src, disk, run.destination);
  if (pin) return `the destination no longer holds ${pin.backup}, the last backup replicated to it, nor any other backup in common with the source: a full copy starts a new chain`;
  if (held.length > 0) return 'the destination holds no backup in common with the source: a full copy starts a new chain';
  return `first replication of ${disk} to this destination: a full copy`;
}

/** What to send, oldest first, each as a delta of a backup the destination holds (or will by then) or as a full. */
async function planSteps(run: Run, disk: string, sourceBackups: BackupMetadata[], held: Map<string, BackupMetadata>, common: BackupMetadata | null): Promise<Step[]> {
  const { src, dst } = run;
  const newest = sourceBackups.at(-1)!;
  // Without a common backup only the newest is sent (as zrep starts a new chain): older ones would each be another full.
  const wanted = common ? sourceBackups.filter((b) => b.id > common.id) : [newest];
  const steps: Step[] = [];
  const planned = new Set<string>();
  const sound = new Set<string>();
  for (const meta of wanted) {
    if (held.has(meta.id)) throw new VaultError(dst.diskDir(disk), `holds a backup ${meta.id} that differs from the source's backup of that id: refusing to replicate over it`);
    let parent: string | null = null;
    let reason: string | undefined;
    if (!common) reason = await noCommonReason(run, disk, [...held.values()]);
    else if (meta.parent !== null) {
      const there = held.get(meta.parent);
      const sourceParent = sourceBackups.find((b) => b.id === meta.parent);
      if (planned.has(meta.parent)) parent = meta.parent;
      else if (!there || !sourceParent || !(await sameBackup(run, sourceParent, there))) reason = `the destination lacks its parent ${meta.parent}: a full copy`;
      else if (sound.has(there.id)) parent = there.id;
      else {
        // The check a backup runs before building a delta: a delta over a broken chain could never be restored.
        const findings = await lineageFindings(dst, there);
        if (findings.length > 0) reason = `the destination's chain under ${there.id} cannot be built on (${describeFinding(findings[0]!)}): a full copy`;
        else {
          sound.add(there.id);
          parent = there.id;
        }
      }
    }
    steps.push({ meta, parent, reason, blocks: await blocksToSend(src, meta, parent === null && meta.parent !== null) });
    planned.add(meta.id);
  }
  return steps;
}

/** How many blocks a step reads: what the backup stores, or for a synthesized full what its chain stores. */
async function blocksToSend(src: Repository, meta: BackupMetadata, synthesized: boolean): Promise<number> {
  if (synthesized) {
    const chain = await openBackupChain(src, meta);
    const n = blocksWithData(chain).length;
    await chain.close();
    return n;
  }
  const data = await openBackupData(src, meta);
  const n = [...range(data.blockCount)].filter((b) => data.isAllocated(b)).length;
  await data.close();
  return n;
}

/** Under the destination disk's lock: send every source backup newer than the newest in common. */
async function sendMissing(run: Run, disk: string, result: DiskReplication): Promise<void> {
  const { src, dst } = run;
  const sourceBackups = await src.backups(disk);
  const newest = sourceBackups.at(-1);
  if (!newest) return;
  const heldList = await dst.backups(disk);
  const held = new Map(heldList.map((b) => [b.id, b]));
  const heldNewest = heldList.at(-1);
  if (heldNewest && heldNewest.id > newest.id) {
    throw new VaultError(dst.diskDir(disk), `holds backup ${heldNewest.id}, newer than the source's newest (${newest.id}): it did not come from ${src.root}; refusing to mix the two`);
  }
  const common = await newestCommon(run, sourceBackups, held);
  result.skipped = sourceBackups.filter((b) => held.has(b.id) && (!common || b.id <= common.id)).map((b) => b.id);
  const steps = await planSteps(run, disk, sourceBackups, held, common);
  const total = steps.reduce((n, s) => n + s.blocks, 0);
  let done = 0;
  let bytesSent = 0;
  const progress = (blocks: number, bytes: number) => {
    done += blocks;
    bytesSent += bytes;
    run.options.onProgress?.(disk, done, total, bytesSent);
  };
  for (const step of steps) result.copied.push(await sendBackup(run, disk, step, progress));
}

/** A stored block as sent: bitmap and data, and the block file's bytes when the destination stores them as they are. */
interface SentBlock {
  bitmap: Buffer;
  data: Buffer;
  stored?: Buffer;
}

/** Where a step's blocks come from: the backup's own data, or (a synthesized full) its whole chain. */
interface StepSource {
  blocks: number[];
  /** The source VHD's footer timestamp: the copy keeps it, as it keeps the UUID. */
  timestamp: number;
  /** The block, checked against the backup's digests; null for a block a full need not store (zeros). */
  read(block: number): Promise<SentBlock | null>;
  close(): Promise<void>;
}

/** The blocks the backup's own data stores, each checked against its digest where it is whole. */
async function ownBlocks(run: Run, meta: BackupMetadata, digests: Buffer, copyCodec: Compression | null): Promise<StepSource> {
  const { src } = run;
  const layout = src.layoutOf(meta);
  const data: VhdDisk = await openBackupData(src, meta);
  const storedSize = bitmapByteSize(data.blockSize) + data.blockSize;
  // Same codec of block files on both sides: they go across byte for byte, never recompressed.
  const codec = layout.storedCodec(meta);
  const asStored = codec !== null && codec === copyCodec;
  const differencing = data.footer.diskType === 'differencing';
  const readAsStored = async (block: number): Promise<SentBlock> => {
    const stored = await layout.readStored(src, meta, block);
    const plain = await decompress(codec!, stored, storedSize);
    if (plain.length !== storedSize) throw new VaultError(data.path, `block ${block} is ${plain.length} bytes, expected ${storedSize} (bitmap + block)`);
    return { bitmap: plain.subarray(0, storedSize - data.blockSize), data: plain.subarray(storedSize - data.blockSize), stored };
  };
  return {
    blocks: [...range(data.blockCount)].filter((b) => data.isAllocated(b)),
    timestamp: data.footer.timestamp,
    async read(block) {
      const sent = asStored ? await readAsStored(block) : await data.readBlock(block);
      if (!sent) throw new VaultError(data.path, `block ${block} vanished while it was read`);
      run.read.bytes += (sent as SentBlock).stored?.length ?? storedSize;
      // A partial block of a differencing disk is only part of the disk's block: nothing to check it against alone.
      const whole = !differencing || isBitmapFull(sent.bitmap, data.blockSize / SECTOR_SIZE);
      if (whole && !src.digester.of(sent.data).equals(digests.subarray(block * DIGEST_SIZE, (block + 1) * DIGEST_SIZE))) {
        throw new VaultError(src.diskDir(meta.disk), `backup ${meta.id} block ${block} does not match its digest: not replicated (run vhdvault verify on the source)`);
      }
      return sent;
    },
    close: () => data.close(),
  };
}

/** Every block the backup's chain stores, read through the chain (digests checked): a full backup of the disk at that point. */
async function chainBlocks(run: Run, meta: BackupMetadata): Promise<StepSource> {
  const { chain, source } = await verifiedChain(run.src, meta);
  const whole = fullBitmap(meta.blockSize);
  return {
    blocks: blocksWithData(chain),
    timestamp: chain.top.footer.timestamp,
    async read(block) {
      const data = await source.readBlock(block);
      run.read.bytes += meta.blockSize;
      // A full stores no all-zero block (as a full backup does not).
      return data && !isAllZero(data) ? { bitmap: whole, data } : null;
    },
    close: () => source.close(),
  };
}

/**
 * Send one backup: its blocks into the destination's staged data (in the
 * destination's layout and codec), its digests beside them, then the
 * destination's commit (metadata last). A kill before the commit leaves only
 * staged names the next writer removes; during it, pending metadata the next
 * writer rolls forward.
 */
async function sendBackup(run: Run, disk: string, step: Step, progress: (blocks: number, bytes: number) => void): Promise<CopiedBackup> {
  const { src, dst } = run;
  const { meta } = step;
  const sourceDigests = await readDigests(run, meta);
  const parent = step.parent === null ? null : await dst.backup(disk, step.parent);
  const full = parent === null;
  // The destination's digests: the source's, or recomputed as the blocks go when the two digest differently.
  const recomputed = sameDigests(run) ? null : await DigestTranslation.start(run, meta, parent);
  let digests = sourceDigests;
  let reader: StepSource | null = null;
  try {
    // The same disk as the source's backup: same UUID and timestamp (a merge carries both forward likewise).
    const timestamp = await footerTimestamp(src, meta);
    const writer = await dst.layout.createWriter(dst, { disk, id: meta.id, size: meta.size, blockCount: meta.blockCount, uuid: meta.uuid, parent, previous: null, timestamp });
    let sent: { blocks: number; bytes: number };
    try {
      reader = full && meta.parent !== null ? await chainBlocks(run, meta) : await ownBlocks(run, meta, sourceDigests, writer.storedCodec);
      sent = await sendBlocks(run, recomputed ? recomputed.through(reader) : reader, writer, progress);
      if (recomputed) digests = await recomputed.finish();
      await run.writeLimit.take(digests.length);
      await run.write.time(() => writer.finish(digests));
    } catch (err) {
      throw await cleanUpAfter(err, () => writer.abort());
    }
    const fields = { disk, id: meta.id, parent: parent?.id ?? null, size: meta.size, blockCount: meta.blockCount, uuid: meta.uuid, blocksWritten: sent.blocks, bytesWritten: sent.bytes };
    const copy = { ...newBackupMetadata(dst, { ...fields, bytesStored: await writer.storedBytes(sent.bytes) }, digests), createdAt: meta.createdAt };
    // A delta copied as stored has whole blocks only if the source's had.
    if (!full && meta.wholeBlocks !== true) delete copy.wholeBlocks;
    await run.write.time(() => dst.commitBackup(copy, digests));
    run.write.bytes += copy.bytesStored;
    progress(0, digests.length);
    return { id: meta.id, how: full ? 'full' : 'delta', ...(step.reason ? { reason: step.reason } : {}), blocks: sent.blocks, bytesSent: copy.bytesStored };
  } finally {
    await reader?.close();
  }
}

/** Both repositories digest blocks alike (both plain): digests go across as they are. */
function sameDigests(run: Run): boolean {
  return run.src.digester.key === null && run.dst.digester.key === null;
}

/**
 * The destination's digests of a backup when its repository digests
 * differently from the source's (encryption keys its digests): a block sent
 * is digested as it goes; one not sent is the destination parent's (a delta)
 * or zeros (a full). A partial block (another writer's delta) is read whole
 * through the source's chain, checked there, and digested.
 */
class DigestTranslation {
  private chain: Awaited<ReturnType<typeof verifiedChain>> | null = null;

  private constructor(
    private readonly run: Run,
    private readonly meta: BackupMetadata,
    private readonly digests: Buffer,
  ) {}

  static async start(run: Run, meta: BackupMetadata, parent: BackupMetadata | null): Promise<DigestTranslation> {
    const digests = Buffer.alloc(meta.blockCount * DIGEST_SIZE);
    if (parent === null) {
      const zero = run.dst.digester.zero(meta.blockSize);
      for (let b = 0; b < meta.blockCount; b++) zero.copy(digests, b * DIGEST_SIZE);
    } else {
      const theirs = await run.dst.layoutOf(parent).openDigests(run.dst, parent);
      try {
        for (let b = 0; b < meta.blockCount; b++) (await theirs.get(b)).copy(digests, b * DIGEST_SIZE);
      } finally {
        await theirs.close();
      }
    }
    return new DigestTranslation(run, meta, digests);
  }

  /** `reader`, digesting each block it gives for the destination. */
  through(reader: StepSource): StepSource {
    return {
      ...reader,
      read: async (block) => {
        const sent = await reader.read(block);
        const whole = sent === null || isBitmapFull(sent.bitmap, this.meta.blockSize / SECTOR_SIZE);
        const content = whole ? (sent?.data ?? null) : await this.wholeBlock(block);
        (content ? this.run.dst.digester.of(content) : this.run.dst.digester.zero(this.meta.blockSize)).copy(this.digests, block * DIGEST_SIZE);
        return sent;
      },
    };
  }

  private async wholeBlock(block: number): Promise<Buffer | null> {
    this.chain ??= await verifiedChain(this.run.src, this.meta);
    return this.chain.source.readBlock(block);
  }

  async finish(): Promise<Buffer> {
    await this.chain?.source.close();
    return this.digests;
  }
}

/** The VHD footer timestamp of a backup's own data. */
async function footerTimestamp(repo: Repository, meta: BackupMetadata): Promise<number> {
  const data = await openBackupData(repo, meta);
  await data.close();
  return data.footer.timestamp;
}

/** The source backup's digests, checked for size. */
async function readDigests(run: Run, meta: BackupMetadata): Promise<Buffer> {
  const k = run.src.digestsKey(meta.disk, meta.id);
  const digests = await run.read.time(() => run.src.storage.get(k));
  run.read.bytes += digests.length;
  if (digests.length !== meta.blockCount * DIGEST_SIZE) throw new VaultError(run.src.storage.describe(k), `digests file has ${digests.length} bytes, expected ${meta.blockCount * DIGEST_SIZE}`);
  checkDigestsBinding(digests, meta, run.src.storage.describe(k));
  return digests;
}

/** A step's blocks into the destination's writer, read (and checked) ahead of the writes, at the destination's pace. */
async function sendBlocks(run: Run, reader: StepSource, writer: BackupWriter, progress: (blocks: number, bytes: number) => void): Promise<{ blocks: number; bytes: number }> {
  const codec = writer.storedCodec;
  const produce = async (block: number) => {
    const sent = await run.read.time(() => reader.read(block));
    // Compressed here, ahead of the writes, when the codecs differ.
    if (sent && codec !== null && !sent.stored) sent.stored = await compress(codec, Buffer.concat([sent.bitmap, sent.data]));
    return sent;
  };
  let [blocks, bytes] = [0, 0];
  for await (const [block, sent] of orderedReadAhead(reader.blocks, READ_AHEAD, produce)) {
    if (!sent) {
      progress(1, 0);
      continue;
    }
    const size = sent.stored?.length ?? sent.bitmap.length + sent.data.length;
    await run.writeLimit.take(size);
    await run.write.time(() => writer.storeBlock(block, sent));
    blocks++;
    bytes += size;
    progress(1, size);
  }
  return { blocks, bytes };
}

/** The destination's own retention, once this disk's copies are committed (it takes the disk's lock itself). */
async function applyRetention(run: Run, disk: string, policy: RetentionPolicy, result: DiskReplication): Promise<void> {
  const report = await prune(run.dst, disk, {
    policy,
    onWait: run.options.onWait,
    onFinding: (f) => run.options.onWarning?.(`destination ${describeFinding(f)}`),
  });
  result.pruned = report.removed;
  const refused = report.refused[0];
  if (refused) throw new VaultError(run.dst.diskDir(disk), `the destination's retention was refused: ${refused.problem}`);
}

/** Point the source's pin at the newest backup both hold now (after the destination's commits and retention). */
async function pinCommon(run: Run, disk: string): Promise<string | null> {
  const held = new Map((await run.dst.backups(disk)).map((b) => [b.id, b]));
  const common = await newestCommon(run, await run.src.backups(disk), held);
  if (common) await pinReplica(run.src, common, run.destination);
  return common?.id ?? null;
}
