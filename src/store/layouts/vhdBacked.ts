import { bitmapByteSize, fullBitmap, isSectorSet, setSector } from '../../vhd/bitmap.js';
import type { Compression } from '../../vhd/compression.js';
import { SECTOR_SIZE } from '../../vhd/constants.js';
import type { StoredBlock, VhdDisk } from '../../vhd/disk.js';
import { serializeFooter } from '../../vhd/footer.js';
import { openDisk } from '../../vhd/openDisk.js';
import { checkParent, VhdChain } from '../../vhd/VhdChain.js';
import type { ParentLink } from '../../vhd/VhdWriter.js';
import { type BatchOp, bytesBelow, isNotFound, isUnavailable, type StorageCapabilities } from '../../storage/Storage.js';
import { VaultError } from '../../util/errors.js';
import { checkDigestsBinding, DIGEST_SIZE, DigestReader } from '../digests.js';
import type { Finding } from '../finding.js';
import { deletingKey, digestsKey, inDisk, metadataKey, pendingMetadataKey, stagedDigestsKey, stagedName } from '../keys.js';
import { lineage } from '../lineage.js';
import { type BackupMetadata, type LayoutName, metadataText } from '../metadata.js';
import { isBackupId } from '../names.js';
import type { BackupWriter, Digests, Layout, LayoutContext, LayoutMerge, MergeJournal, Removal, WriterSpec } from './Layout.js';

/**
 * What the dir and vhd layouts share: each backup is a VHD (a directory or a
 * file) plus a digests file, a delta is a differencing VHD over its parent's,
 * commits are renames, and a merge folds the child's blocks into the parent's
 * data, which then takes the child's identity and name (docs/design/04-repository.md §4.6, §4.9).
 */

/** The journal's fields of a VHD-backed merge. */
interface VhdMergeJournal extends MergeJournal {
  /** The merged result's footer: the parent's with the child's UUID and timestamp (base64). */
  footer: string;
}

/** The two backups of a merge, as their data's keys and files. */
export interface MergePair {
  journal: VhdMergeJournal;
  parentKey: string;
  childKey: string;
  parentPath: string;
  childPath: string;
  /** Where the parent's blocks that the child's replace are set aside. */
  replacedKey: string;
}

/** What differs between the dir and vhd layouts. */
export interface VhdFormat {
  name: LayoutName;
  /** Its files are written whole (sealable) rather than in place. */
  sealable: boolean;
  /** `<id>.<extension>`: the backup's data. */
  extension: string;
  checkCompression(compression: Compression): void;
  storedCompression(compression: Compression): Compression;
  /** A staged VHD of the new backup at `path`, over `link`. */
  createWriter(ctx: LayoutContext, spec: WriterSpec, path: string, link: ParentLink | undefined): Promise<BackupWriter>;
  /** Blocks the data's table marks present whose storage is missing (a directory's block files). */
  missingBlocks(ctx: LayoutContext, dataKey: string, disk: VhdDisk): Promise<string[]>;
  /** Merge step 'blocks': every block of the child into the parent's data. */
  mergeBlocks(ctx: LayoutContext, pair: MergePair, resumed: boolean): Promise<void>;
  /** Merge step 'identity': the parent's data takes the merged footer (and table). */
  mergeIdentity(ctx: LayoutContext, pair: MergePair): Promise<void>;
  /** The identity of the parent's data when it cannot be opened mid-step (a half-written file), if it is one of the merge's. */
  unopenedParent(ctx: LayoutContext, pair: MergePair): Promise<{ uuid: string; differencing: boolean } | undefined>;
  readStored(ctx: LayoutContext, meta: BackupMetadata, block: number): Promise<Buffer>;
  storedCodec(meta: BackupMetadata): Compression | null;
}

/**
 * A partial child block laid over the parent's block (or zeros): the child's
 * sectors win. Over a differencing parent the result keeps the union of both
 * bitmaps, so sectors neither holds still come from further down the chain;
 * over a full disk every sector is defined (absent ones read as zeros).
 * Idempotent: laying the child over an already combined block changes nothing.
 */
export function overlayBlock(parent: StoredBlock | null, child: StoredBlock, blockSize: number, parentIsDifferencing: boolean): StoredBlock {
  const data = parent ? Buffer.from(parent.data) : Buffer.alloc(blockSize);
  const bitmap = !parentIsDifferencing ? fullBitmap(blockSize) : parent ? Buffer.from(parent.bitmap) : Buffer.alloc(bitmapByteSize(blockSize));
  for (let s = 0; s < blockSize / SECTOR_SIZE; s++) {
    if (!isSectorSet(child.bitmap, s)) continue;
    child.data.copy(data, s * SECTOR_SIZE, s * SECTOR_SIZE, (s + 1) * SECTOR_SIZE);
    setSector(bitmap, s);
  }
  return { bitmap, data };
}

/**
 * What a staged VHD (file or directory) and its digests share at the end:
 * finish makes the VHD durable under its staged name, then stages the
 * digests; abort removes both.
 */
export function stagedVhd(ctx: LayoutContext, disk: string, dataName: string, id: string, vhd: { finish(): Promise<void>; abort(): Promise<void> }): Pick<BackupWriter, 'finish' | 'abort' | 'storedBytes'> {
  const staged = [inDisk(disk, stagedName(dataName)), stagedDigestsKey(disk, id)];
  return {
    async finish(digests) {
      await vhd.finish();
      await ctx.storage.put(stagedDigestsKey(disk, id), digests);
    },
    // Each removal is tried; the first that fails is reported.
    async abort() {
      const removals = await Promise.allSettled([vhd.abort(), ...staged.map((k) => ctx.storage.delete(k))]);
      const failed = removals.find((r) => r.status === 'rejected');
      if (failed) throw failed.reason;
    },
    storedBytes: () => bytesBelow(ctx.storage, staged),
  };
}

/** The child's data, moved aside by the swap (the merged result takes its name). */
const trashName = (childData: string) => `.${childData}.merged.tmp`;
/** The parent's blocks that the child's replaced (renaming over them would free them on the spot). */
const replacedName = (parentId: string) => `.${parentId}.replaced.tmp`;

const there = async (ctx: LayoutContext, ...keys: string[]) => (await Promise.all(keys.map((k) => ctx.storage.head(k)))).some((x) => x !== null);

/** A layout driver for VHD-backed backups in `format`. */
export function vhdBackedLayout(format: VhdFormat): Layout {
  return new VhdBackedLayout(format);
}

class VhdBackedLayout implements Layout {
  readonly name: LayoutName;
  readonly dataSuffix: string;
  readonly sharedBlocks = false;
  readonly sealable: boolean;
  readonly merge: LayoutMerge;
  private readonly noRemoval: Removal = { before: async () => undefined, after: async () => 0 };

  constructor(private readonly format: VhdFormat) {
    this.name = format.name;
    this.sealable = format.sealable;
    this.dataSuffix = `.${format.extension}`;
    this.merge = new VhdMerge(this, format);
  }

  unsupportedOn(capabilities: StorageCapabilities): string | null {
    return capabilities.localFiles && capabilities.rename ? null : `the ${this.name} layout renames files and writes them in place`;
  }

  checkCompression(compression: Compression): void {
    this.format.checkCompression(compression);
  }

  storedCompression(compression: Compression): Compression {
    return this.format.storedCompression(compression);
  }

  dataName(id: string): string {
    return `${id}${this.dataSuffix}`;
  }

  dataKey(disk: string, id: string): string {
    return inDisk(disk, this.dataName(id));
  }

  private stagedDataKey(disk: string, id: string): string {
    return inDisk(disk, stagedName(this.dataName(id)));
  }

  vhdDataId(name: string): string | null {
    const id = name.slice(0, -this.dataSuffix.length);
    return name.endsWith(this.dataSuffix) && isBackupId(id) ? id : null;
  }

  async createWriter(ctx: LayoutContext, spec: WriterSpec): Promise<BackupWriter> {
    let link: ParentLink | undefined;
    if (spec.parent) {
      const parentDisk = await this.openData(ctx, spec.parent);
      await parentDisk.close();
      // Relative locators only: a moved or copied repository must never reach back into the original.
      link = { uuid: parentDisk.footer.uuid, timestamp: parentDisk.footer.timestamp, relativePath: this.dataName(spec.parent.id) };
    }
    return this.format.createWriter(ctx, spec, ctx.localPath(this.stagedDataKey(spec.disk, spec.id)), link);
  }

  commit(ctx: LayoutContext, meta: BackupMetadata): Promise<void> {
    return this.finishCommit(ctx, meta);
  }

  async hasCommitFiles(ctx: LayoutContext, { disk, id }: BackupMetadata): Promise<boolean> {
    return (await there(ctx, this.stagedDataKey(disk, id), this.dataKey(disk, id))) && (await there(ctx, stagedDigestsKey(disk, id), digestsKey(disk, id)));
  }

  /** Data and digests renamed into place (those an interrupted run did not rename already), the metadata last. */
  async finishCommit(ctx: LayoutContext, { disk, id }: BackupMetadata): Promise<void> {
    const ops: BatchOp[] = [];
    if (await ctx.storage.head(this.stagedDataKey(disk, id))) ops.push({ rename: this.stagedDataKey(disk, id), to: this.dataKey(disk, id) });
    if (await ctx.storage.head(stagedDigestsKey(disk, id))) ops.push({ rename: stagedDigestsKey(disk, id), to: digestsKey(disk, id) });
    ops.push({ rename: pendingMetadataKey(disk, id), to: metadataKey(disk, id) });
    await ctx.storage.batch(ops);
  }

  async abandoned(): Promise<boolean> {
    return false;
  }

  /**
   * The intent goes only once the data and digests are durably gone: the digests' removal fsyncs
   * the disk's folder, which holds the data's name too. The intent's own removal need not be durable:
   * one a crash brings back makes the next cleanup redo a deletion that is already done.
   */
  async deleteFiles(ctx: LayoutContext, disk: string, id: string): Promise<void> {
    await ctx.storage.delete(this.dataKey(disk, id), { durable: false });
    await ctx.storage.delete(digestsKey(disk, id));
    await ctx.storage.delete(deletingKey(disk, id), { durable: false });
  }

  keepsTemporary(): boolean {
    return false;
  }

  async openData(ctx: LayoutContext, meta: BackupMetadata): Promise<VhdDisk> {
    const path = ctx.localPath(this.dataKey(meta.disk, meta.id));
    let disk: VhdDisk;
    try {
      disk = await openDisk(path, { seal: ctx.directorySeal(meta.disk) });
    } catch (err) {
      if (!(err instanceof VaultError)) throw err;
      throw new VaultError(err.file, `${err.problem} (data of backup ${meta.id})`);
    }
    if (disk.footer.uuid !== meta.uuid) {
      await disk.close();
      throw new VaultError(path, `has UUID ${disk.footer.uuid}, backup ${meta.id} records ${meta.uuid}`);
    }
    return disk;
  }

  async openChain(ctx: LayoutContext, meta: BackupMetadata): Promise<VhdChain> {
    const members: VhdDisk[] = [];
    try {
      for (const m of await lineage(ctx, meta)) members.push(await this.openData(ctx, m));
    } catch (err) {
      await Promise.all(members.map((m) => m.close()));
      throw err;
    }
    return VhdChain.fromMembers(members);
  }

  /** Read in ranges as they are needed (a restore checks each block against them; verify checks their binding). */
  openDigests(ctx: LayoutContext, meta: BackupMetadata): Promise<Digests> {
    return DigestReader.open(ctx.storage, digestsKey(meta.disk, meta.id), meta.blockCount);
  }

  readStored(ctx: LayoutContext, meta: BackupMetadata, block: number): Promise<Buffer> {
    return this.format.readStored(ctx, meta, block);
  }

  storedCodec(meta: BackupMetadata): Compression | null {
    return this.format.storedCodec(meta);
  }

  missingFiles(ctx: LayoutContext, meta: BackupMetadata, names: ReadonlySet<string>): Array<Pick<Finding, 'kind' | 'problem'>> {
    const out: Array<Pick<Finding, 'kind' | 'problem'>> = [];
    if (!names.has(this.dataName(meta.id))) out.push({ kind: 'missing-data', problem: `its data ${ctx.storage.describe(this.dataKey(meta.disk, meta.id))} is missing` });
    if (!names.has(`${meta.id}.digests`)) out.push({ kind: 'missing-digests', problem: `its digests file ${ctx.storage.describe(digestsKey(meta.disk, meta.id))} is missing` });
    return out;
  }

  structureFindings(ctx: LayoutContext, backups: BackupMetadata[], options: { digests?: boolean } = {}): Promise<Finding[]> {
    return structureFindings(ctx, this, this.format, backups, options.digests === true);
  }

  removal(): Removal {
    return this.noRemoval;
  }
}

/** A merge of VHD-backed backups: the child's blocks into the parent's data, which takes the child's identity, then its name. */
class VhdMerge implements LayoutMerge {
  readonly steps = ['blocks', 'identity', 'swap'];

  constructor(
    private readonly layout: VhdBackedLayout,
    private readonly format: VhdFormat,
  ) {}

  private pair(ctx: LayoutContext, journal: MergeJournal): MergePair {
    const { parent, child } = journal;
    const [parentKey, childKey] = [this.layout.dataKey(parent.disk, parent.id), this.layout.dataKey(child.disk, child.id)];
    return { journal: journal as VhdMergeJournal, parentKey, childKey, parentPath: ctx.localPath(parentKey), childPath: ctx.localPath(childKey), replacedKey: inDisk(child.disk, replacedName(parent.id)) };
  }

  async begin(ctx: LayoutContext, parent: BackupMetadata, child: BackupMetadata): Promise<Record<string, unknown>> {
    const [parentDisk, childDisk] = [await this.layout.openData(ctx, parent), await this.layout.openData(ctx, child)];
    await parentDisk.close();
    await childDisk.close();
    return { footer: serializeFooter({ ...parentDisk.footer, uuid: childDisk.footer.uuid, timestamp: childDisk.footer.timestamp }).toString('base64') };
  }

  sound(journal: MergeJournal): boolean {
    return typeof journal.footer === 'string';
  }

  mismatch(ctx: LayoutContext, journal: MergeJournal): Promise<string | null> {
    return journalMismatch(ctx, this.format, this.pair(ctx, journal));
  }

  async run(ctx: LayoutContext, journal: MergeJournal, step: string, resumed: boolean): Promise<void> {
    const p = this.pair(ctx, journal);
    if (step === 'blocks') await this.format.mergeBlocks(ctx, p, resumed);
    else if (step === 'identity') await this.format.mergeIdentity(ctx, p);
    else await this.swap(ctx, p);
  }

  /**
   * The merged data takes the child's name: the child's data is moved aside
   * (not deleted) and the parent's data renamed in its place. Idempotent: once
   * the parent's name is gone, the swap is done.
   */
  private async swap(ctx: LayoutContext, p: MergePair): Promise<void> {
    if (!(await ctx.storage.head(p.parentKey))) return;
    const trash = inDisk(p.journal.child.disk, trashName(this.layout.dataName(p.journal.child.id)));
    const ops: BatchOp[] = [];
    if (await ctx.storage.head(p.childKey)) ops.push({ rename: p.childKey, to: trash });
    ops.push({ rename: p.parentKey, to: p.childKey });
    await ctx.storage.batch(ops);
  }

  merged({ parent, child }: MergeJournal): BackupMetadata {
    return {
      ...child,
      kind: parent.kind,
      parent: parent.parent,
      wholeBlocks: parent.wholeBlocks === true && child.wholeBlocks === true,
      blocksWritten: child.blocksWritten,
      // An upper bound until reclaim() recounts (walking thousands of block files is not worth delaying the commit).
      bytesStored: parent.bytesStored + child.bytesStored,
    };
  }

  /**
   * The recount first (it counts the merged data only, not what was set aside): its metadata write
   * is durable, and an fsync after the freeing would wait for the filesystem to discard the freed space.
   * Then the garbage goes, both folders at once and not durably: the merge is committed, so what a
   * crash brings back is still garbage, which the next writer's cleanup removes (leftover()).
   */
  async reclaim(ctx: LayoutContext, { parent, child }: MergeJournal): Promise<void> {
    const meta = await ctx.backup(child.disk, child.id);
    const bytesStored = await bytesBelow(ctx.storage, [this.layout.dataKey(meta.disk, meta.id), digestsKey(meta.disk, meta.id)]);
    if (bytesStored !== meta.bytesStored) await ctx.storage.put(metadataKey(meta.disk, meta.id), metadataText({ ...meta, bytesStored }));
    const garbage = [replacedName(parent.id), trashName(this.layout.dataName(child.id))];
    await Promise.all(garbage.map((name) => ctx.storage.delete(inDisk(child.disk, name), { durable: false })));
  }

  /**
   * What a merge set aside (`.<P>.replaced.tmp`: the removed backup's replaced blocks;
   * `.<C-data>.merged.tmp`: the child's old data) is garbage once the merge committed.
   * Its journal is gone then — but also if someone removed it by hand mid-merge, when
   * these may be all that is left of a backup. So look: committed means P is no longer
   * listed, and C's recorded parent (if any) is listed with its data there.
   */
  async leftover(ctx: LayoutContext, disk: string, name: string, names: string[]): Promise<boolean | null> {
    const replacedOf = /^\.(.+)\.replaced\.tmp$/.exec(name)?.[1];
    if (replacedOf !== undefined) return isBackupId(replacedOf) && !names.includes(`${replacedOf}.json`);
    const suffix = `${this.layout.dataSuffix}.merged.tmp`;
    if (!name.startsWith('.') || !name.endsWith(suffix)) return null;
    const mergedOf = name.slice(1, -suffix.length);
    if (!isBackupId(mergedOf)) return false;
    const child = await ctx.backup(disk, mergedOf).catch(() => null);
    if (!child || !names.includes(this.layout.dataName(child.id))) return false;
    if (child.parent === null) return true;
    const parent = await ctx.backup(disk, child.parent).catch(() => null);
    return parent !== null && names.includes(this.layout.dataName(parent.id));
  }
}

/**
 * The structure of VHD-backed backups, without reading block data: every
 * backup's data and digests of the right shape, its VHD's UUID as recorded,
 * its parent listed and linked as the metadata says. Each backup's data is
 * opened once (headers and tables only).
 */
async function structureFindings(ctx: LayoutContext, layout: VhdBackedLayout, format: VhdFormat, backups: BackupMetadata[], readDigests: boolean): Promise<Finding[]> {
  const findings: Finding[] = [];
  const opened = new Map<string, VhdDisk>();
  try {
    for (const meta of backups) {
      const problem = (text: string) => findings.push({ disk: meta.disk, id: meta.id, kind: 'structure', problem: text });
      const dataKey = layout.dataKey(meta.disk, meta.id);
      if (!(await ctx.storage.head(dataKey))) continue; // missingFiles names it
      try {
        const disk = await layout.openData(ctx, meta);
        opened.set(meta.id, disk);
        for (const text of await format.missingBlocks(ctx, dataKey, disk)) problem(text);
      } catch (err) {
        if (!(err instanceof VaultError)) throw err;
        problem(err.message);
      }
      const digests = digestsKey(meta.disk, meta.id);
      const size = (await ctx.storage.head(digests))?.size ?? null;
      if (size !== null && size !== meta.blockCount * DIGEST_SIZE) problem(`its digests file ${ctx.storage.describe(digests)} has ${size} bytes, ${meta.blockCount * DIGEST_SIZE} expected`);
      // Read whole (32 bytes per 2 MiB block): another backup's digests, or damaged ones, must stop a
      // prune before it deletes the file — it may be the only copy of what it holds.
      else if (size !== null && readDigests) {
        try {
          checkDigestsBinding(await ctx.storage.get(digests), meta, ctx.storage.describe(digests));
        } catch (err) {
          if (isNotFound(err)) continue; // removed since the listing: missingFiles says so
          if (!(err instanceof VaultError) || isUnavailable(err)) throw err;
          problem(err.message);
        }
      }
    }
    for (const meta of backups) {
      const disk = opened.get(meta.id);
      const parent = meta.parent === null ? undefined : opened.get(meta.parent);
      if (!disk || (meta.parent !== null && !parent)) continue;
      try {
        if (parent && disk.footer.diskType !== 'differencing') throw new VaultError(disk.path, `is a ${disk.footer.diskType} disk, but backup ${meta.id} is a delta of ${meta.parent}`);
        if (!parent && disk.footer.diskType === 'differencing') throw new VaultError(disk.path, `is a differencing disk, but backup ${meta.id} is recorded as full`);
        if (parent) checkParent(disk, parent);
      } catch (err) {
        if (!(err instanceof VaultError)) throw err;
        findings.push({ disk: meta.disk, id: meta.id, kind: 'structure', problem: err.message });
      }
    }
  } finally {
    await Promise.all([...opened.values()].map((d) => d.close()));
  }
  return findings;
}

/**
 * Does the disk look like the state the journal's step implies? A journal is
 * only ever resumed over the backups it was written for: before the metadata
 * step both are listed as parent and child; the data under the parent's name
 * carries the parent's UUID until the identity step gives it the child's; after
 * the swap the child's name holds the merged result (a disk of the parent's
 * kind). Returns what does not match, or null.
 */
async function journalMismatch(ctx: LayoutContext, format: VhdFormat, p: MergePair): Promise<string | null> {
  const { parent, child, step } = p.journal;
  const listed = async (id: string) => ctx.backup(child.disk, id).catch(() => null);
  const uuidAt = async (k: string) => {
    if (!(await ctx.storage.head(k))) return null;
    const disk = await openDisk(ctx.localPath(k), { seal: ctx.directorySeal(child.disk) }).catch(() => null);
    await disk?.close();
    return disk ? { uuid: disk.footer.uuid, differencing: disk.footer.diskType === 'differencing' } : undefined;
  };
  const childMeta = await listed(child.id);
  if (!childMeta) return `backup ${child.id} is not listed`;
  let parentData = await uuidAt(p.parentKey);
  const childData = await uuidAt(p.childKey);
  if (parentData === undefined) parentData = await format.unopenedParent(ctx, p);
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
