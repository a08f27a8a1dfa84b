import { basename, extname } from 'node:path';
import { VhdError } from '../vhd/errors.js';
import { copyDisk, createDiskWriter } from '../vhd/convert.js';
import type { BlockSource } from '../vhd/source.js';
import { blocksWithData, synthesizeVhd } from '../vhd/synthesize.js';
import type { VhdChain } from '../vhd/VhdChain.js';
import { checkFormatFits, implicitFormat, outputTarget, refuseProtected, writeImage } from '../vhd/outputTarget.js';
import type { OnProgress } from '../util/progress.js';
import { DigestReader, digestOf, zeroDigest } from './digests.js';
import { openBackupChain } from './chain.js';
import { readingDisk } from './merge.js';
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

/** The backup to restore: the named one, or the disk's latest. Call as a reader of the disk (readingDisk). */
export async function pickBackup(repo: Repository, disk: string, id?: string): Promise<BackupMetadata> {
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
  const chain = await openBackupChain(repo, meta);
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
 * Restore a backup to `out` (see outputTarget.ts): a dynamic VHD streamed
 * straight from the chain (synthesized, never materializing intermediate
 * disks), or a raw image. A file appears under its name only when complete
 * (raw: sparse); a device or `-` gets every byte, zeros included. Format:
 * `options.format`, else raw on a device or `-`, else by extension.
 */
async function restoreAsReader(repo: Repository, disk: string, out: string, options: { backup?: string; format?: RestoreFormat; onProgress?: OnProgress }): Promise<RestoreReport> {
  // Checked before anything is read: a restore never writes into the repository.
  const target = await outputTarget(out);
  const format = options.format ?? implicitFormat(target) ?? (extname(out).toLowerCase() === '.vhd' ? 'vhd' : 'raw');
  checkFormatFits(target, format);
  await refuseProtected(target, [{ path: repo.root, what: `the repository ${repo.root}` }]);
  const meta = await pickBackup(repo, disk, options.backup);
  const { chain, source } = await verifiedChain(repo, meta);
  try {
    if (format === 'raw') {
      await copyDisk(source, await createDiskWriter(target, 'raw', source.size, source.blockSize), options.onProgress);
      return { id: meta.id, format: 'raw', size: meta.size, bytesWritten: meta.size };
    }
    const image = synthesizeVhd(chain, (b) => source.readBlock(b));
    await writeImage(target, image, options.onProgress);
    return { id: meta.id, format: 'vhd', size: meta.size, bytesWritten: image.length };
  } finally {
    await source.close();
  }
}

/**
 * Restore a backup (the disk's latest unless `options.backup`) to `out`, as a
 * reader of the disk: a merge or deletion never runs beside it (access.ts).
 */
export function restore(...args: Parameters<typeof restoreAsReader>): ReturnType<typeof restoreAsReader> {
  const [repo, disk] = args;
  return readingDisk(repo, disk, 'restore', () => restoreAsReader(...args));
}
