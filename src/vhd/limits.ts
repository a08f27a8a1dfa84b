import { MAX_BAT_SECTOR, MAX_BLOCK_SIZE, MAX_DISK_SIZE, MAX_TABLE_ENTRIES, MIN_BLOCK_SIZE, SECTOR_SIZE } from './constants.js';
import { bitmapByteSize } from './bitmap.js';
import { UsageError } from '../util/errors.js';

export function validateDiskSize(size: number): void {
  if (!Number.isSafeInteger(size) || size <= 0) throw new UsageError(`disk size must be a positive number of bytes, got ${size}`);
  if (size % SECTOR_SIZE !== 0) throw new UsageError(`disk size ${size} is not a multiple of 512 bytes`);
  if (size > MAX_DISK_SIZE) throw new UsageError(`disk size ${size} bytes is above the VHD maximum of 2040 GiB (${MAX_DISK_SIZE} bytes)`);
}

export function validateBlockSize(blockSize: number): void {
  if (!Number.isSafeInteger(blockSize) || blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE || (blockSize & (blockSize - 1)) !== 0) {
    throw new UsageError(`block size must be a power of two from 4K to 256M, got ${blockSize}`);
  }
}

/**
 * A disk of `size` bytes in `blockSize` blocks must fit our table limit, and
 * every block, once stored (bitmap + data, after the metadata), must start at a
 * sector a 32-bit BAT entry can address.
 */
export function validateTable(size: number, blockSize: number, metadataBytes: number): void {
  const blocks = Math.ceil(size / blockSize);
  if (blocks > MAX_TABLE_ENTRIES) {
    throw new UsageError(`a ${size}-byte disk in ${blockSize}-byte blocks needs ${blocks} table entries, more than the ${MAX_TABLE_ENTRIES} supported: use a larger block size`);
  }
  const lastBlockStart = metadataBytes + (blocks - 1) * (bitmapByteSize(blockSize) + blockSize);
  if (lastBlockStart / SECTOR_SIZE > MAX_BAT_SECTOR) {
    throw new UsageError(`a ${size}-byte disk in ${blockSize}-byte blocks would store data past the 2 TiB a VHD table can address: use a larger block size`);
  }
}
