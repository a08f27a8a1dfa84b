import type { DynamicHeader } from './header.js';
import type { Footer } from './footer.js';
import { bitmapByteSize as bitmapSizeOf, setSector } from './bitmap.js';
import { SECTOR_SIZE } from './constants.js';

/** One stored block: its sector bitmap and its full `blockSize` bytes of data. */
export interface StoredBlock {
  bitmap: Buffer;
  data: Buffer;
}

/**
 * What a chain needs from one member, whatever its storage
 * (a VHD file today, an exploded directory later).
 */
export interface VhdDisk {
  readonly path: string;
  readonly footer: Footer;
  /** Null for fixed disks. */
  readonly header: DynamicHeader | null;
  /** Virtual size in bytes. */
  readonly size: number;
  readonly blockSize: number;
  readonly blockCount: number;
  isAllocated(block: number): boolean;
  /** The block as stored, or null when it is not allocated here. */
  readBlock(block: number): Promise<StoredBlock | null>;
  /** Whether readBlockRange() reads part of a block in place (else blocks are read whole). */
  readonly rangeReads?: boolean;
  /** `length` bytes at `offset` of an allocated block's data. */
  readBlockRange?(block: number, offset: number, length: number): Promise<Buffer>;
  /** The data of parent locator `index` (0-7), or null when it is absent or unreadable. */
  readLocatorData(index: number): Promise<Buffer | null>;
  close(): Promise<void>;
}

/** A member that can store blocks (a VHD file or directory opened for writing). */
export interface WritableVhdDisk extends VhdDisk {
  /** Store a whole block with its sector bitmap (default: every sector present), durably. */
  writeBlock(block: number, data: Buffer, bitmap?: Buffer): Promise<void>;
}

/**
 * Write sector-aligned bytes at a disk offset: each touched block is read,
 * patched and rewritten, and the patched sectors are marked present.
 */
export async function writeSectors(disk: WritableVhdDisk, diskOffset: number, bytes: Buffer): Promise<void> {
  if (diskOffset % SECTOR_SIZE !== 0 || bytes.length % SECTOR_SIZE !== 0) {
    throw new RangeError('writeSectors needs sector-aligned offset and length');
  }
  if (diskOffset + bytes.length > disk.size) throw new RangeError('write past the end of the disk');
  const { blockSize } = disk;
  let done = 0;
  while (done < bytes.length) {
    const at = diskOffset + done;
    const block = Math.floor(at / blockSize);
    const inBlock = at - block * blockSize;
    const length = Math.min(blockSize - inBlock, bytes.length - done);
    const current = await disk.readBlock(block);
    const data = current ? Buffer.from(current.data) : Buffer.alloc(blockSize);
    const bitmap = current ? Buffer.from(current.bitmap) : Buffer.alloc(bitmapSizeOf(blockSize));
    bytes.copy(data, inBlock, done, done + length);
    for (let s = inBlock / SECTOR_SIZE; s < (inBlock + length) / SECTOR_SIZE; s++) setSector(bitmap, s);
    await disk.writeBlock(block, data, bitmap);
    done += length;
  }
}
