import pLimit from 'p-limit';
import { bitmapByteSize, isBitmapFull, setBit } from '../../vhd/bitmap.js';
import { type Compression, compress } from '../../vhd/compression.js';
import { SECTOR_SIZE } from '../../vhd/constants.js';
import type { VhdDisk } from '../../vhd/disk.js';
import { BAT_FILE, blockFile, FOOTER_FILE, VhdDirectory, VhdDirectoryWriter } from '../../vhd/VhdDirectory.js';
import { key, type Storage } from '../../storage/Storage.js';
import { VaultError } from '../../util/errors.js';
import type { BlockTarget } from '../blockTask.js';
import { inDisk } from '../keys.js';
import type { BackupWriter, LayoutContext } from './Layout.js';
import { type MergePair, overlayBlock, stagedVhd, vhdBackedLayout } from './vhdBacked.js';

/**
 * The dir layout: each backup a VHD directory (Xen Orchestra's exploded
 * layout, one file per 2 MiB block, compressed with the repository's codec).
 * Workers write the block files straight into the staged directory, and a
 * retention merge renames the child's block files over the parent's.
 */

const dataKeyOf = (meta: { disk: string; id: string }) => inDisk(meta.disk, `${meta.id}.vhd-dir`);

/** Blocks the directory's bat marks present whose files are not there: one listing per 1000 blocks. */
async function missingBlocks(ctx: LayoutContext, dataKey: string, disk: VhdDisk): Promise<string[]> {
  if (!(disk instanceof VhdDirectory)) return [];
  const missing: string[] = [];
  const folders = new Map<number, Set<string>>();
  for (let b = 0; b < disk.blockCount; b++) {
    if (!disk.isAllocated(b)) continue;
    const folder = Math.floor(b / 1000);
    if (!folders.has(folder)) folders.set(folder, new Set(await ctx.storage.list(key(dataKey, 'blocks', String(folder)))));
    if (!folders.get(folder)!.has(String(b % 1000))) missing.push(`${ctx.storage.describe(key(dataKey, ...blockFile(b).split('/')))}: block ${b} is missing although the bat marks it present`);
  }
  return missing;
}

/** Is this stored block whole (every sector present)? Reads only the bitmap of an uncompressed file. */
async function wholeBlockInDirectory(storage: Storage, dirKey: string, dir: VhdDirectory, block: number): Promise<boolean> {
  const sectors = dir.blockSize / SECTOR_SIZE;
  if (dir.compression === 'none') {
    const bitmap = await storage.get(key(dirKey, ...blockFile(block).split('/')), { offset: 0, length: bitmapByteSize(dir.blockSize) });
    return isBitmapFull(bitmap, sectors);
  }
  const stored = await dir.readBlock(block);
  return stored !== null && isBitmapFull(stored.bitmap, sectors);
}

/**
 * Every block of the child goes into the parent's blocks/: a whole block is
 * renamed over the parent's (no data copied; one rename per block); a partial
 * one is combined with the parent's block. Idempotent: a child block file that
 * is gone was moved by an interrupted run. Until the swap, only merge recovery
 * reads these two backups (every command finishes a pending merge first).
 */
async function mergeBlocks(ctx: LayoutContext, p: MergePair, resumed: boolean): Promise<void> {
  const { storage } = ctx;
  const seal = ctx.directorySeal(p.journal.child.disk);
  const parent = await VhdDirectory.open(p.parentPath, { seal });
  const child = await VhdDirectory.open(p.childPath, { seal });
  // vhdvault stores whole blocks only (docs/design/04-repository.md §4.3); other writers' blocks are checked one by one.
  const knownWhole = p.journal.child.wholeBlocks === true && child.compression === parent.compression;
  const parentIsDifferencing = parent.footer.diskType === 'differencing';
  const blockKey = (dataKey: string, b: number) => key(dataKey, ...blockFile(b).split('/'));
  const limit = pLimit(16);
  const aside: Array<[string, string]> = [];
  const moves: Array<[string, string]> = [];
  const partial: number[] = [];
  const allocated = Array.from({ length: child.blockCount }, (_, b) => b).filter((b) => child.isAllocated(b));
  await Promise.all(
    allocated.map((b) =>
      limit(async () => {
        const [source, target] = [blockKey(p.childKey, b), blockKey(p.parentKey, b)];
        const whole = knownWhole || (child.compression === parent.compression && (await wholeBlockInDirectory(storage, p.childKey, child, b).catch(() => true)));
        if (!whole) return void partial.push(b);
        // Resume: a child block file that is gone was moved by the interrupted run; then
        // `target` already holds the child's data and must not be moved aside again.
        // (A fresh run knows every source exists: the structure was checked, and spares the look-up.)
        if (resumed && !(await storage.head(source))) return;
        // Move the replaced block aside first: freeing 2 MiB inside the rename costs ~40× the rename.
        if (parent.isAllocated(b)) aside.push([target, key(p.replacedKey, String(b))]);
        moves.push([source, target]);
      }),
    ),
  );
  const move = storage.moveAll?.bind(storage);
  if (!move) throw new VaultError(ctx.root, 'this storage cannot rename: a dir-layout merge needs it');
  // Not made durable on their own: setting a replaced block aside only keeps its freeing out of the
  // rename over it. A crash that undoes some leaves those blocks where they were, and the resumed run
  // sets them aside again (or, had only the move survived, the block would have been freed by it);
  // either way nothing reads a replaced block again. The moves' folder fsyncs cover the parent's folder.
  await move(aside, { ignoreMissing: true, durable: false });
  await move(moves, { ignoreMissing: resumed });
  // A partial block is combined with the parent's and stored whole over it; the child's file goes after.
  for (const b of partial) {
    const stored = await child.readBlock(b).catch(() => null);
    if (stored === null) continue; // already combined and removed by an interrupted run
    const merged = isBitmapFull(stored.bitmap, child.blockSize / SECTOR_SIZE) ? stored : overlayBlock(await parent.readBlock(b).catch(() => null), stored, child.blockSize, parentIsDifferencing);
    await storage.put(blockKey(p.parentKey, b), await compress(parent.compression, Buffer.concat([merged.bitmap, merged.data])));
    await storage.delete(blockKey(p.childKey, b));
  }
}

/** The parent's bat gains the child's blocks; its footer takes the child's identity. */
async function mergeIdentity(ctx: LayoutContext, p: MergePair): Promise<void> {
  const seal = ctx.directorySeal(p.journal.child.disk);
  const parent = await VhdDirectory.open(p.parentPath, { seal });
  const child = await VhdDirectory.open(p.childPath, { seal });
  const bits = Buffer.alloc(Math.ceil(parent.header.maxTableEntries / 8));
  for (let b = 0; b < parent.blockCount; b++) {
    if (parent.isAllocated(b) || child.isAllocated(b)) setBit(bits, b);
  }
  // Both at once, their fsyncs overlapping: the step is redone whole after a crash, so their order does not matter.
  const [bat, footer] = [await compress(parent.compression, bits), await compress(parent.compression, Buffer.from(p.journal.footer, 'base64'))];
  await Promise.all([ctx.storage.put(key(p.parentKey, BAT_FILE), bat), ctx.storage.put(key(p.parentKey, FOOTER_FILE), footer)]);
}

/** A staged VHD directory whose block files the workers create (storage.create), made durable together by finish(). */
function directoryWriter(ctx: LayoutContext, disk: string, id: string, writer: VhdDirectoryWriter, codec: Compression): BackupWriter {
  const sealing = ctx.sealing ?? undefined;
  const target = (block: number): BlockTarget => ({ storage: ctx.storage.descriptor, sealing, key: key(inDisk(disk, writer.stagingName), ...blockFile(block).split('/')) });
  return {
    codec,
    bare: false,
    storedCodec: codec,
    writesInOrder: false,
    async output(block, paced) {
      await writer.prepareBlockFile(block);
      // Under a write limit the file is written only once the limiter lets its bytes through.
      return paced ? { kind: 'prepare' } : { kind: 'write', target: target(block) };
    },
    place: (block) => target(block),
    record: async (block) => writer.adoptBlock(block),
    async storeBlock(block, given) {
      await writer.prepareBlockFile(block);
      const stored = given.stored ?? (await compress(codec, Buffer.concat([given.bitmap, given.data])));
      await ctx.storage.create(target(block).key, [stored]);
      writer.adoptBlock(block);
      return stored.length;
    },
    ...stagedVhd(ctx, disk, `${id}.vhd-dir`, id, writer),
  };
}

export const dirLayout = vhdBackedLayout({
  name: 'dir',
  sealable: true,
  extension: 'vhd-dir',
  checkCompression: () => undefined,
  storedCompression: (c) => c,
  async createWriter(ctx, spec, path, link) {
    const codec = ctx.config.compression;
    const writer = await VhdDirectoryWriter.create(path, { size: spec.size, blockSize: ctx.config.blockSize, parent: link, uuid: spec.uuid, compression: codec, seal: ctx.directorySeal(spec.disk) });
    if (spec.timestamp !== undefined) writer.footer.timestamp = spec.timestamp;
    return directoryWriter(ctx, spec.disk, spec.id, writer, codec);
  },
  missingBlocks,
  mergeBlocks,
  mergeIdentity,
  unopenedParent: async () => undefined,
  readStored: (ctx, meta, block) => ctx.storage.get(key(dataKeyOf(meta), ...blockFile(block).split('/'))),
  storedCodec: (meta) => meta.compression,
});
