import { MAX_BLOCK_SIZE, MAX_DISK_SIZE, MIN_BLOCK_SIZE, SECTOR_SIZE } from './constants.js';
import { UsageError } from './errors.js';

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
