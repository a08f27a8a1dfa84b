import { SECTOR_SIZE } from './constants.js';

/**
 * Sector bitmaps precede each stored block: one bit per sector, most significant
 * bit first, padded to whole sectors. In a differencing disk a 1 means "this
 * sector is stored here", a 0 "read it from the parent".
 */
export function bitmapByteSize(blockSize: number): number {
  const bytes = Math.ceil(blockSize / SECTOR_SIZE / 8);
  return Math.ceil(bytes / SECTOR_SIZE) * SECTOR_SIZE;
}

export function fullBitmap(blockSize: number): Buffer {
  const b = Buffer.alloc(bitmapByteSize(blockSize));
  b.fill(0xff, 0, Math.ceil(blockSize / SECTOR_SIZE / 8));
  return b;
}

/**
 * Bit `index` of a most-significant-bit-first bit array (sector bitmaps, a VHD
 * directory's `bat`, changed-block bitmaps); bits past the end read as 0.
 */
export function testBit(bits: Uint8Array, index: number): boolean {
  return ((bits[index >> 3] ?? 0) & (0x80 >> (index & 7))) !== 0;
}

export function setBit(bits: Uint8Array, index: number): void {
  bits[index >> 3] = (bits[index >> 3] ?? 0) | (0x80 >> (index & 7));
}

export const isSectorSet = testBit;
export const setSector = setBit;

/** True when every one of the block's `sectors` bits is set. */
export function isBitmapFull(bitmap: Buffer, sectors: number): boolean {
  const whole = sectors >> 3;
  for (let i = 0; i < whole; i++) if (bitmap[i] !== 0xff) return false;
  for (let s = whole * 8; s < sectors; s++) if (!isSectorSet(bitmap, s)) return false;
  return true;
}
