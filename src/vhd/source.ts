import { type FileHandle, open, stat } from 'node:fs/promises';
import { SECTOR_SIZE, DEFAULT_BLOCK_SIZE, FOOTER_COOKIE, FOOTER_SIZE, MAX_DISK_SIZE } from './constants.js';
import { isAliasName, resolveAlias } from './alias.js';
import { describeFsError, VaultError } from '../util/errors.js';
import { VhdChain } from './VhdChain.js';
import { ForeignImageError, foreignFormat } from './imageFormat.js';
import { takeBuffer } from '../util/bufferPool.js';
import { blockDeviceSize } from '../util/device.js';
import { notADiskImage } from '../util/files.js';
import { dataBlocks } from './rawExtents.js';

export { ForeignImageError };

/** Bytes an open file or block device holds (fstat says 0 for a device). */
async function sizeOf(fh: FileHandle): Promise<{ size: number; isFile: boolean; isBlockDevice: boolean; allocated: number }> {
  const s = await fh.stat();
  return { size: s.isBlockDevice() ? await blockDeviceSize(fh) : s.size, isFile: s.isFile(), isBlockDevice: s.isBlockDevice(), allocated: s.blocks * 512 };
}

import type { BlockSource } from './blockSource.js';

export type { BlockSource };

/** A raw image; its size is rounded up to whole sectors (the tail reads as zeros). */
export class RawSource implements BlockSource {
  readonly blockCount: number;

  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    private readonly fileSize: number,
    readonly size: number,
    readonly blockSize: number,
    /** Per block, 0 when the file system says it is a hole (see rawExtents.ts); null: read them all. */
    private readonly data: Uint8Array | null,
  ) {
    this.blockCount = Math.ceil(size / blockSize);
  }

  static async open(path: string, blockSize = DEFAULT_BLOCK_SIZE): Promise<RawSource> {
    const fh = await openForReading(path);
    const stat = await sizeOf(fh).catch(async (err: unknown) => {
      await fh.close();
      throw new VaultError(path, describeFsError(err));
    });
    if (!stat.isFile && !stat.isBlockDevice) {
      await fh.close();
      throw new VaultError(path, 'not a regular file');
    }
    const size = Math.ceil(stat.size / SECTOR_SIZE) * SECTOR_SIZE;
    if (size === 0 || size > MAX_DISK_SIZE) {
      await fh.close();
      throw new VaultError(path, size === 0 ? 'raw image is empty' : `raw image of ${stat.size} bytes is above the VHD maximum of 2040 GiB`);
    }
    // A file with as many bytes allocated as it is long has no hole worth asking about.
    const data = stat.isFile && stat.allocated < stat.size ? await dataBlocks(path, stat.size, blockSize) : null;
    return new RawSource(path, fh, stat.size, size, blockSize, data);
  }

  async readBlock(block: number): Promise<Buffer | null> {
    if (this.data !== null && this.data[block] === 0) return null;
    const start = block * this.blockSize;
    const length = Math.max(0, Math.min(this.blockSize, this.fileSize - start));
    const buf = length === this.blockSize ? takeBuffer(this.blockSize) : Buffer.alloc(this.blockSize);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.fh.read(buf, done, length - done, start + done);
      if (bytesRead === 0) throw new VaultError(this.path, `raw image shrank while being read (at offset ${start + done})`);
      done += bytesRead;
    }
    return buf;
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

async function openForReading(path: string): Promise<FileHandle> {
  try {
    return await open(path, 'r');
  } catch (err) {
    throw new VaultError(path, describeFsError(err));
  }
}

/** True when either footer position carries the VHD cookie. */
export async function looksLikeVhd(path: string): Promise<boolean> {
  const fh = await openForReading(path);
  try {
    const { size } = await sizeOf(fh);
    const probe = Buffer.alloc(8);
    for (const at of size >= FOOTER_SIZE ? [0, size - FOOTER_SIZE] : [0]) {
      const { bytesRead } = await fh.read(probe, 0, 8, at);
      if (bytesRead === 8 && probe.toString('latin1') === FOOTER_COOKIE) return true;
    }
    return false;
  } finally {
    await fh.close();
  }
}

export interface SourceOptions {
  /** Read the input as raw bytes even when it looks like a VHD or is named like one. */
  fromRaw?: boolean;
  /** The caller's flag for fromRaw (e.g. `--from raw`), suggested when a `.vhd` is not one. */
  fromRawFlag?: string;
}

/**
 * Open a conversion input: a VHD file or directory (through its whole chain),
 * a Xen Orchestra alias to one, or, when forced or not a VHD, a raw image. A
 * name ending in .vhd must hold a VHD: taking it for a raw image would turn a
 * damaged or mistaken file into a "disk" of garbage.
 */
export async function openSource(path: string, options: SourceOptions = {}): Promise<BlockSource> {
  // The chain is opened through the alias itself: its parent may be named relative to the alias's folder.
  if (isAliasName(path) && !options.fromRaw) return VhdChain.open(path);
  const at = isAliasName(path) ? await resolveAlias(path) : path;
  const s = await stat(at).catch((err: unknown) => {
    throw new VaultError(at, describeFsError(err));
  });
  // Before any open: opening a FIFO would wait for a writer, and none of these can be read at an offset.
  const odd = notADiskImage(s);
  if (odd) throw new VaultError(at, odd);
  // vhdvault's metadata, a job or a report: never a disk, whatever --from says.
  if (/\.json$/i.test(at)) throw new VaultError(at, 'is a JSON file, not a disk image: a backup is given as <repo>/disks/<disk>/<id> inside its repository, a disk as a VHD or raw image');
  if (s.isDirectory()) return VhdChain.open(at);
  if (options.fromRaw) return RawSource.open(at);
  if (await looksLikeVhd(at)) return VhdChain.open(at);
  const foreign = await foreignFormat(at);
  if (foreign) throw new ForeignImageError(at, foreign, options.fromRawFlag);
  if (/\.vhd$/i.test(at)) {
    const hint = options.fromRawFlag ? `; to read it as a raw image, use ${options.fromRawFlag}` : '';
    throw new VaultError(at, `is not a VHD: no VHD footer at its start or end${hint}`);
  }
  return RawSource.open(at);
}
