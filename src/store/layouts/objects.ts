import { randomBytes } from 'node:crypto';
import { VhdChain } from '../../vhd/VhdChain.js';
import { UsageError, VaultError } from '../../util/errors.js';
import { isNotFound, isUnavailable } from '../../storage/Storage.js';
import { DIGEST_SIZE } from '../digests.js';
import type { Finding } from '../finding.js';
import { blocksKey, deletingKey, digestsKey, metadataKey, pendingMetadataKey } from '../keys.js';
import { type BackupMetadata, metadataText } from '../metadata.js';
import { blockObjectKey, collectGarbage, loadBlockMap, objectsNamedBy, SWEEP_MARKER, sweepMarkerKey, trimMapCache } from './blockObjects.js';
import type { BackupWriter, Layout, LayoutContext, LayoutMerge, MergeJournal, WriterSpec } from './Layout.js';
import { ObjectBackupDisk } from './ObjectBackupDisk.js';

/**
 * The objects layout (docs/design/04-repository.md §4.15): each stored block an immutable object
 * named by the SHA-256 of its content, each backup's digests its block map
 * (the whole disk at that backup). Needs only whole puts, gets, lists and
 * deletes, so it runs on any storage; a retention merge rewrites metadata and
 * moves no block, and a prune collects the objects no map names any more.
 */

/** A new backup: block objects uploaded as the workers prepare them, its map put at the commit. */
async function objectsWriter(ctx: LayoutContext, spec: WriterSpec): Promise<BackupWriter> {
  const { disk, id, blockCount } = spec;
  const zero = ctx.digester.zero(ctx.config.blockSize);
  // Objects already in the store that this backup may name without uploading: the parent's, and its own as it goes.
  const present = new Set<string>();
  if (spec.previous) for (let b = 0; b < blockCount; b++) present.add((await spec.previous.get(b)).toString('hex'));
  // Until the commit names them, uploaded objects are garbage only a sweep could find: say so first.
  await ctx.storage.put(sweepMarkerKey(disk, id), '');
  return {
    codec: ctx.config.compression,
    bare: true,
    storedCodec: null,
    writesInOrder: false,
    // A block object is written only once its name (its digest) says it is not in the store already.
    output: async () => ({ kind: 'prepare' }),
    place(_block, digest) {
      const hex = digest.toString('hex');
      // Zeros need no object, and an object already there is named, not sent again.
      const known = digest.equals(zero) || present.has(hex);
      present.add(hex);
      return known ? null : { storage: ctx.storage.descriptor, sealing: ctx.sealing ?? undefined, key: blockObjectKey(disk, digest), whole: true };
    },
    record: async () => undefined,
    storeBlock: async () => {
      throw new UsageError('the objects layout takes blocks from the backup pipeline only');
    },
    // The map goes in at the commit, after the pending metadata (§4.15).
    finish: async () => undefined,
    // What was uploaded stays until a prune's sweep (the marker says so).
    abort: async () => undefined,
    storedBytes: async (bytesWritten) => bytesWritten + blockCount * DIGEST_SIZE,
  };
}

/** Blocks whose object the backup's map names but the store lacks: a delta over them would name them too. */
async function missingObjects(ctx: LayoutContext, meta: BackupMetadata, present: Set<string>): Promise<Array<{ block: number; key: string }>> {
  const map = await loadBlockMap(ctx, meta);
  const missing: Array<{ block: number; key: string }> = [];
  for (let b = 0; b < map.blockCount; b++) {
    if (!map.hasObject(b)) continue;
    const k = blockObjectKey(meta.disk, map.digest(b));
    if (!present.has(k)) missing.push({ block: b, key: k });
  }
  return missing;
}

/** No VHD to open: each map's size, and that every object it names is there (their content is verify's). */
async function structureFindings(ctx: LayoutContext, backups: BackupMetadata[]): Promise<Finding[]> {
  const findings: Finding[] = [];
  // The names of the disk's block objects, listed once: one request per 1000 objects.
  let present: Set<string> | undefined;
  for (const meta of backups) {
    const problem = (text: string) => findings.push({ disk: meta.disk, id: meta.id, kind: 'structure', problem: text });
    const map = await ctx.storage.head(digestsKey(meta.disk, meta.id));
    if (!map) continue; // missingFiles names it
    if (map.size !== meta.blockCount * DIGEST_SIZE) {
      problem(`its block map ${ctx.storage.describe(digestsKey(meta.disk, meta.id))} has ${map.size} bytes, ${meta.blockCount * DIGEST_SIZE} expected`);
      continue;
    }
    if (!present) {
      present = new Set();
      for await (const o of ctx.storage.listAll(blocksKey(meta.disk))) present.add(o.key);
    }
    // A map that cannot be read (damaged, sealed for another place, not the one its metadata records)
    // is this backup's finding: thrown, it would stop the checks of every other backup, and a prune
    // would refuse without saying which backup, nor that nothing was changed.
    let missing: Array<{ block: number; key: string }>;
    try {
      missing = await missingObjects(ctx, meta, present);
    } catch (err) {
      if (!(err instanceof VaultError) || isUnavailable(err)) throw err;
      problem(err.message);
      continue;
    }
    const n = missing.length;
    if (n > 0) problem(`${n} block object${n > 1 ? 's' : ''} its block map names ${n > 1 ? 'are' : 'is'} missing (block ${missing[0]!.block}: ${ctx.storage.describe(missing[0]!.key)}${n > 1 ? ', …' : ''})`);
  }
  return findings;
}

/** The journal of an objects merge carries the child's metadata as it will be. */
interface ObjectsMergeJournal extends MergeJournal {
  merged: BackupMetadata;
}

/**
 * The child's map already names every block of the disk at its point in time,
 * so folding it into its removed parent moves no block: the child's metadata
 * takes the parent's place (its parent, its kind) and the parent is deleted
 * like any removed backup. Objects only the parent named are collected by the
 * prune afterwards (Removal).
 */
const merge: LayoutMerge = {
  steps: [],
  /**
   * The child in the parent's place: the blocks it changed counted against its new
   * parent; their bytes estimated at the two backups' average object size (reading
   * every object's size would cost a request each).
   */
  async begin(ctx, parent, child) {
    const map = await loadBlockMap(ctx, child);
    const base = parent.parent === null ? null : await loadBlockMap(ctx, await ctx.backup(parent.disk, parent.parent));
    const perObject = (parent.bytesWritten + child.bytesWritten) / Math.max(1, parent.blocksWritten + child.blocksWritten);
    let changed = 0;
    for (let b = 0; b < map.blockCount; b++) if (base && b < base.blockCount ? !map.digest(b).equals(base.digest(b)) : map.hasObject(b)) changed++;
    const bytesWritten = Math.round(changed * perObject);
    const merged: BackupMetadata = { ...child, parent: parent.parent, kind: parent.kind, blocksWritten: changed, bytesWritten, bytesStored: bytesWritten + map.bytes.length };
    return { merged };
  },
  sound(j) {
    const { merged, parent, child } = j as ObjectsMergeJournal;
    return merged?.disk === child.disk && merged.id === child.id && merged.parent === parent.parent;
  },
  /** The child must be listed either as it was (a child of the parent) or as the journal's merged result. */
  async mismatch(ctx, j) {
    const { parent, child, merged } = j as ObjectsMergeJournal;
    // Only an absent child makes the journal unsound: a store that fails to answer is an error, not a verdict.
    const now = await ctx.backup(child.disk, child.id).catch((err: unknown) => {
      if (isNotFound(err)) return null;
      throw err;
    });
    if (!now) return `backup ${child.id} is not listed`;
    if (now.uuid !== child.uuid || (now.parent !== parent.id && now.parent !== merged.parent)) return `backup ${child.id} is neither a child of ${parent.id} nor the merged result`;
    return null;
  },
  run: async () => undefined,
  merged: (j) => (j as ObjectsMergeJournal).merged,
  reclaim: async () => undefined,
  leftover: async () => null,
};

export const objectsLayout: Layout = {
  name: 'objects',
  unsupportedOn: () => null,
  checkCompression: () => undefined,
  storedCompression: (c) => c,
  dataSuffix: '.digests',
  dataName: (id) => `${id}.digests`,
  vhdDataId: () => null,

  createWriter: objectsWriter,
  async commit(ctx, meta, digests) {
    if (!digests) throw new VaultError(ctx.diskDir(meta.disk), `backup ${meta.id}: a commit in the objects layout needs its block map`);
    // The map goes in after the pending metadata, so a pending commit without its map is one that never finished.
    await ctx.storage.put(digestsKey(meta.disk, meta.id), digests);
    await objectsLayout.finishCommit(ctx, meta);
    // Every object this backup uploaded is now named by its map: nothing for a sweep to find.
    await ctx.storage.delete(sweepMarkerKey(meta.disk, meta.id));
  },
  hasCommitFiles: async (ctx, meta) => (await ctx.storage.head(digestsKey(meta.disk, meta.id))) !== null,
  async finishCommit(ctx, meta) {
    // No renames on an object store: the final metadata is written whole, then the pending copy goes.
    await ctx.storage.batch([{ put: metadataKey(meta.disk, meta.id), data: metadataText(meta) }, { delete: pendingMetadataKey(meta.disk, meta.id) }]);
  },
  abandoned: async (ctx, meta) => !(await objectsLayout.hasCommitFiles(ctx, meta)),
  async deleteFiles(ctx, disk, id) {
    // Objects, not folders: no listing below each name. The map first, the intent last.
    await ctx.storage.deleteMany([digestsKey(disk, id)]);
    await ctx.storage.deleteMany([deletingKey(disk, id)]);
  },
  // A sweep marker is removed only by the collection it asks for.
  keepsTemporary: (name) => SWEEP_MARKER.test(name),

  openData: (ctx, meta, options) => ObjectBackupDisk.open(ctx, meta, options),
  // A backup's map is the whole disk: a chain of one.
  openChain: async (ctx, meta, options) => VhdChain.fromMembers([await ObjectBackupDisk.open(ctx, meta, options)]),
  openDigests: (ctx, meta, options) => loadBlockMap(ctx, meta, options),
  sharedBlocks: true,
  sealable: true,
  readStored: async (ctx, meta) => {
    throw new VaultError(ctx.diskDir(meta.disk), `backup ${meta.id}: block objects are read through its block map`);
  },
  storedCodec: () => null,

  missingFiles(ctx, meta, names) {
    // The map is the backup's data: nothing of it can be read.
    return names.has(`${meta.id}.digests`) ? [] : [{ kind: 'missing-data', problem: `its block map ${ctx.storage.describe(digestsKey(meta.disk, meta.id))} is missing` }];
  },
  structureFindings,

  merge,
  removal(ctx, disk) {
    // What the removed backups' maps name may be freed; a marker says so until it is collected.
    let candidates = new Set<string>();
    const marker = `prune-${process.pid}-${randomBytes(4).toString('hex')}`;
    let marked = false;
    return {
      async before(removed) {
        candidates = await objectsNamedBy(ctx, removed);
        await ctx.storage.put(sweepMarkerKey(disk, marker), '');
        marked = true;
      },
      // No backup of the disk runs (the prune holds its lock), and no reader reads an object no map names.
      async after() {
        const { objects } = await collectGarbage(ctx, disk, candidates, marked ? marker : undefined);
        if (marked) await ctx.storage.delete(sweepMarkerKey(disk, marker));
        await trimMapCache(ctx, disk);
        return objects;
      },
    };
  },
};
