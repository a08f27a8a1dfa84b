import { extname } from 'node:path';
import { UsageError, VaultError } from '../util/errors.js';
import { copyDisk, createDiskWriter } from '../vhd/convert.js';
import type { BlockSource } from '../vhd/source.js';
import { blocksWithData, synthesizeDynamic, synthesizeVhd } from '../vhd/synthesize.js';
import { range } from '../util/pipeline.js';
import type { VhdChain } from '../vhd/VhdChain.js';
import { checkFormatFits, implicitFormat, outputTarget, refuseProtected, writeImage } from '../vhd/outputTarget.js';
import type { OnProgress } from '../util/progress.js';
import { verifiedChain } from './chain.js';
import { readingDisk } from './merge.js';
import type { BackupMetadata, Repository } from './repository.js';

/**
 * Writes kept beside a backup (serve --writable's overlay, exports/overlay.ts),
 * laid over it by a restore: the backup and the layer together are the disk restored.
 */
export interface RestoreLayer {
  /** Where the layer is, for messages; a restore never writes over it. */
  path: string;
  /** Its disk, the backup it sits on, and the repository it was made over (for messages). */
  info(): Promise<{ disk: string; backup: string; repository: string }>;
  /** Open it over the backup: `over` lays it on the backup's blocks; `allocated` says which blocks it holds. */
  open(repo: Repository, meta: BackupMetadata): Promise<{ over(source: BlockSource): BlockSource; allocated(block: number): boolean; close(): Promise<void> }>;
}

/** vhd: a dynamic VHD; raw: sparse bytes; fixed: a fixed VHD; dir: an exploded VHD directory (Xen Orchestra's layout). */
export type RestoreFormat = 'vhd' | 'raw' | 'fixed' | 'dir';

const BY_EXTENSION: Record<string, RestoreFormat> = { '.vhd': 'vhd', '.vhd-dir': 'dir' };
/** Names of image formats restore does not write. */
const FOREIGN_EXTENSIONS = ['.qcow2', '.qcow', '.qed', '.vmdk', '.vdi', '.vhdx'];

export interface RestoreReport {
  id: string;
  format: RestoreFormat;
  size: number;
  bytesWritten: number;
}

/** The backup to restore: the named one, or the disk's latest. Call as a reader of the disk (readingDisk). */
export async function pickBackup(repo: Repository, disk: string, id?: string): Promise<BackupMetadata> {
  if (id) return repo.backup(disk, id);
  const latest = await repo.latest(disk);
  if (!latest) throw await repo.noSuchDisk(disk);
  return latest;
}

/**
 * Restore a backup to `out` (see outputTarget.ts): a dynamic VHD streamed
 * straight from the chain (synthesized, never materializing intermediate
 * disks), or a raw image. A file appears under its name only when complete
 * (raw: sparse); a device or `-` gets every byte, zeros included. Format:
 * `options.format`, else raw on a device or `-`, else by extension.
 */
async function restoreAsReader(repo: Repository, disk: string, out: string, options: { backup?: string; format?: RestoreFormat; layer?: RestoreLayer; onProgress?: OnProgress }): Promise<RestoreReport> {
  // Checked before anything is read: a restore never writes into the repository.
  const target = await outputTarget(out);
  const ext = extname(out).toLowerCase();
  // Raw bytes in a file named .qcow2 (or another format's name) would be taken for that format, and misread.
  if (options.format === undefined && FOREIGN_EXTENSIONS.includes(ext)) {
    throw new UsageError(`${out}: restore writes raw images, VHDs and VHD directories, not ${ext.slice(1)}: name the file .raw (or give --format raw) and convert it (qemu-img convert -f raw -O ${ext.slice(1)} …); a whole VM restores to qcow2 with vhdvault vm restore`);
  }
  const format = options.format ?? implicitFormat(target) ?? BY_EXTENSION[ext] ?? 'raw';
  checkFormatFits(target, format);
  if (repo.storage.capabilities.localFiles) await refuseProtected(target, [{ path: repo.root, what: `the repository ${repo.root}` }]);
  let backupId = options.backup;
  const { layer } = options;
  const info = await layer?.info();
  if (layer && info) {
    if (info.disk !== disk) throw new VaultError(layer.path, `is an overlay of disk "${info.disk}", not "${disk}"`);
    if (backupId && backupId !== info.backup) throw new UsageError(`--backup ${backupId} differs from the overlay's backup ${info.backup} (leave --backup out)`);
    backupId = info.backup;
    await refuseProtected(target, [{ path: layer.path, what: `the overlay ${layer.path}` }]);
  }
  const meta = await pickBackup(repo, disk, backupId).catch(async (err: unknown) => {
    if (!layer || !info || !(err instanceof VaultError)) throw err;
    throw new VaultError(layer.path, `sits on backup ${info.backup} of "${disk}", which ${repo.root} does not hold (pruned, or the overlay was made over ${info.repository}): its writes cannot be restored without that backup`);
  });
  const overlay = layer ? await layer.open(repo, meta) : null;
  let chain: VhdChain;
  let source: BlockSource;
  try {
    ({ chain, source } = await verifiedChain(repo, meta));
  } catch (err) {
    await overlay?.close();
    throw err;
  }
  try {
    const disk = overlay ? overlay.over(source) : source;
    if (format !== 'vhd') {
      const writer = await createDiskWriter(target, format, disk.size, disk.blockSize);
      const stats = await copyDisk(disk, writer, options.onProgress);
      return { id: meta.id, format, size: meta.size, bytesWritten: format === 'raw' ? meta.size : stats.dataBlocks * meta.blockSize };
    }
    let image = synthesizeVhd(chain, (b) => source.readBlock(b));
    if (overlay) {
      // Backup and overlay together are a new disk: a new UUID, and every block either holds.
      const present = new Set([...blocksWithData(chain), ...[...range(chain.blockCount)].filter((b) => overlay.allocated(b))]);
      image = synthesizeDynamic(chain, [...present].sort((a, b) => a - b), (b) => disk.readBlock(b));
    }
    await writeImage(target, image, options.onProgress);
    return { id: meta.id, format: 'vhd', size: meta.size, bytesWritten: image.length };
  } finally {
    await source.close();
    await overlay?.close();
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
