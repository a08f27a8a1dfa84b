import { open } from 'node:fs/promises';
import { isBitmapFull } from '../../vhd/bitmap.js';
import { SECTOR_SIZE, FOOTER_SIZE } from '../../vhd/constants.js';
import { parseFooter } from '../../vhd/footer.js';
import { VhdFile } from '../../vhd/VhdFile.js';
import { DynamicVhdWriter } from '../../vhd/VhdWriter.js';
import { UsageError, VaultError } from '../../util/errors.js';
import type { BackupWriter, LayoutContext } from './Layout.js';
import { type MergePair, overlayBlock, stagedVhd, vhdBackedLayout } from './vhdBacked.js';

/**
 * The vhd layout: each backup an ordinary dynamic or differencing VHD file,
 * uncompressed, that any hypervisor imports. Blocks are appended by the main
 * thread in order; a retention merge writes the child's blocks into the
 * parent's file in place: the one layout whose data is local by nature.
 */

/** VHD files: the child's blocks are copied into the parent file (combined where partial). */
async function mergeBlocks(_ctx: LayoutContext, p: MergePair): Promise<void> {
  const parent = await VhdFile.open(p.parentPath, { writable: true });
  const child = await VhdFile.open(p.childPath);
  const parentIsDifferencing = parent.footer.diskType === 'differencing';
  try {
    // A resumed run must not leave the interrupted run's half-appended block as dead space.
    await parent.trimUnreferencedTail();
    for (let b = 0; b < child.blockCount; b++) {
      if (!child.isAllocated(b)) continue;
      const stored = (await child.readBlock(b))!;
      const whole = isBitmapFull(stored.bitmap, child.blockSize / SECTOR_SIZE);
      const merged = whole ? stored : overlayBlock(await parent.readBlock(b), stored, child.blockSize, parentIsDifferencing);
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
async function mergeIdentity(_ctx: LayoutContext, p: MergePair): Promise<void> {
  const footer = Buffer.from(p.journal.footer, 'base64');
  const fh = await open(p.parentPath, 'r+');
  try {
    const { size } = await fh.stat();
    await fh.write(footer, 0, FOOTER_SIZE, size - FOOTER_SIZE);
    await fh.write(footer, 0, FOOTER_SIZE, 0);
    await fh.sync();
  } finally {
    await fh.close();
  }
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

/**
 * A parent file killed mid-append does not open until the resumed blocks step
 * trims it; killed between the identity step's two footer writes, its copies
 * differ, each carrying one of the two identities.
 */
async function unopenedParent(_ctx: LayoutContext, p: MergePair): Promise<{ uuid: string; differencing: boolean } | undefined> {
  const { parent, child, step } = p.journal;
  if (step === 'blocks') return { uuid: parent.uuid, differencing: parent.parent !== null };
  if (step !== 'identity') return undefined;
  const uuids = await footerCopyUuids(p.parentPath);
  return uuids?.every((uuid) => uuid === parent.uuid || uuid === child.uuid) ? { uuid: uuids[1]!, differencing: parent.parent !== null } : undefined;
}

/** A staged VHD file: the main thread appends each block, in order. */
function fileWriter(ctx: LayoutContext, disk: string, id: string, writer: DynamicVhdWriter): BackupWriter {
  return {
    codec: 'none',
    bare: false,
    storedCodec: null,
    writesInOrder: true,
    output: async () => ({ kind: 'data' }),
    place: () => null,
    record: (block, data) => writer.writeBlock(block, data!),
    async storeBlock(block, given) {
      await writer.writeBlock(block, given.data, given.bitmap);
      return given.bitmap.length + given.data.length;
    },
    ...stagedVhd(ctx, disk, `${id}.vhd`, id, writer),
  };
}

export const vhdLayout = vhdBackedLayout({
  name: 'vhd',
  sealable: false,
  extension: 'vhd',
  checkCompression(compression) {
    if (compression !== 'none') throw new UsageError('compression applies to the dir and objects layouts only (VHD files are stored uncompressed)');
  },
  storedCompression: () => 'none',
  async createWriter(ctx, spec, path, link) {
    const writer = await DynamicVhdWriter.create(path, { size: spec.size, blockSize: ctx.config.blockSize, parent: link, uuid: spec.uuid });
    if (spec.timestamp !== undefined) writer.footer.timestamp = spec.timestamp;
    return fileWriter(ctx, spec.disk, spec.id, writer);
  },
  missingBlocks: async () => [],
  mergeBlocks,
  mergeIdentity,
  unopenedParent,
  readStored: async (ctx, meta) => {
    throw new VaultError(ctx.diskDir(meta.disk), `backup ${meta.id} is a VHD file: its blocks are not stored apart`);
  },
  storedCodec: () => null,
});
