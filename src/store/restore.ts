import { basename } from 'node:path';
import { VhdError } from '../vhd/errors.js';
import { copyDisk, createDiskWriter } from '../vhd/convert.js';
import type { BlockSource } from '../vhd/source.js';
import { blocksWithData, synthesizeVhd } from '../vhd/synthesize.js';
import { VhdChain } from '../vhd/VhdChain.js';
import { AtomicFile } from '../util/fsync.js';
import { DigestReader, digestOf, zeroDigest } from './digests.js';
import { settlePendingMerge } from './merge.js';
import type { BackupMetadata, Repository } from './repository.js';

export type RestoreFormat = 'vhd' | 'raw';

export interface RestoreReport {
  id: string;
  format: RestoreFormat;
  size: number;
  bytesWritten: number;
}

/** Which backup a chain member is (its data is named `<id>.vhd` or `<id>.vhd-dir`). */
const backupIdOf = (path: string) => basename(path).replace(/\.(vhd-dir|vhd)$/, '');

/** The backup to restore: the named one, or the disk's latest. */
export async function pickBackup(repo: Repository, disk: string, id?: string): Promise<BackupMetadata> {
  await settlePendingMerge(repo, disk);
  if (id) return repo.backup(disk, id);
  const latest = await repo.latest(disk);
  if (!latest) throw new VhdError(repo.diskDir(disk), `disk "${disk}" has no backups`);
  return latest;
}

/**
 * The backup's chain as a block source whose every block is checked against
 * the backup's digests: wrong data fails, naming the backup and block, instead
 * of being emitted.
 */
async function verifiedChain(repo: Repository, meta: BackupMetadata): Promise<{ chain: VhdChain; source: BlockSource }> {
  const chain = await VhdChain.open(repo.dataPath(meta.disk, meta.id, meta.layout));
  let digests: DigestReader;
  try {
    if (chain.size !== meta.size || chain.blockCount !== meta.blockCount) {
      throw new VhdError(chain.top.path, `holds ${chain.size} bytes, backup ${meta.id} records ${meta.size}`);
    }
    digests = await DigestReader.open(repo.digestsPath(meta.disk, meta.id), meta.blockCount);
  } catch (err) {
    await chain.close();
    throw err;
  }
  const zero = zeroDigest(meta.blockSize);
  const readBlock = async (block: number): Promise<Buffer | null> => {
    const data = await chain.readBlock(block);
    const expected = await digests.get(block);
    if (!(data ? digestOf(data) : zero).equals(expected)) {
      const holder = chain.members.find((m) => m.isAllocated(block));
      const where = holder ? ` (block stored in backup ${backupIdOf(holder.path)})` : ' (no backup of the chain stores it)';
      throw new VhdError(repo.diskDir(meta.disk), `backup ${meta.id} block ${block} does not match its digest${where}`);
    }
    return data;
  };
  const source: BlockSource = {
    size: chain.size,
    blockSize: chain.blockSize,
    blockCount: chain.blockCount,
    readBlock,
    close: async () => {
      await digests.close();
      await chain.close();
    },
  };
  // A block no member stores reads as zeros: its recorded digest must say so too.
  const carried = new Set(blocksWithData(chain));
  for (let b = 0; b < chain.blockCount; b++) {
    if (!carried.has(b) && !(await digests.get(b)).equals(zero)) {
      await source.close();
      throw new VhdError(repo.diskDir(meta.disk), `backup ${meta.id} block ${b} is missing: no backup of its chain stores it`);
    }
  }
  return { chain, source };
}

/**
 * Restore a backup to `out`: a dynamic VHD streamed straight from the chain
 * (synthesized, never materializing intermediate disks), or a sparse raw image.
 * The output appears under its name only when complete.
 */
export async function restore(repo: Repository, disk: string, out: string, options: { backup?: string; format: RestoreFormat }): Promise<RestoreReport> {
  const meta = await pickBackup(repo, disk, options.backup);
  const { chain, source } = await verifiedChain(repo, meta);
  try {
    if (options.format === 'raw') {
      await copyDisk(source, await createDiskWriter(out, 'raw', source.size, source.blockSize));
      return { id: meta.id, format: 'raw', size: meta.size, bytesWritten: meta.size };
    }
    const image = synthesizeVhd(chain, (b) => source.readBlock(b));
    const file = await AtomicFile.create(out);
    await file.commit(async () => {
      let at = 0;
      for await (const chunk of image.stream as AsyncIterable<Buffer>) {
        await file.handle.write(chunk, 0, chunk.length, at);
        at += chunk.length;
      }
      if (at !== image.length) throw new Error(`synthesized ${at} bytes, announced ${image.length}`);
    });
    return { id: meta.id, format: 'vhd', size: meta.size, bytesWritten: image.length };
  } finally {
    await source.close();
  }
}
