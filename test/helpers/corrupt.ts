/**
 * Byte-level surgery on VHD files for the bad-input corpus (test/badInput.test.ts).
 * Offsets are those of the VHD specification; everything is big-endian.
 */
import { createHash } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { vhdChecksum } from '../../src/vhd/checksum.js';

export const FOOTER_SIZE = 512;
export const HEADER_SIZE = 1024;
export const HEADER_OFFSET = 512;

/** Footer field offsets. */
export const F = {
  cookie: 0,
  formatVersion: 12,
  dataOffset: 16,
  timestamp: 24,
  currentSize: 48,
  checksum: 64,
  diskType: 60,
  uuid: 68,
} as const;

/** Dynamic header field offsets. */
export const H = {
  cookie: 0,
  tableOffset: 16,
  headerVersion: 24,
  maxTableEntries: 28,
  blockSize: 32,
  checksum: 36,
  parentUuid: 40,
  parentName: 64,
  locators: 576,
  locatorSize: 24,
} as const;

export function fixFooterChecksum(footer: Buffer): void {
  footer.writeUInt32BE(vhdChecksum(footer.subarray(0, FOOTER_SIZE), F.checksum), F.checksum);
}

export function fixHeaderChecksum(header: Buffer): void {
  header.writeUInt32BE(vhdChecksum(header.subarray(0, HEADER_SIZE), H.checksum), H.checksum);
}

/** The footer copy at offset 0 (a view: edits go to the file image). */
export function headFooter(image: Buffer): Buffer {
  return image.subarray(0, FOOTER_SIZE);
}

/** The footer at the end of the file (a view). */
export function tailFooter(image: Buffer): Buffer {
  return image.subarray(image.length - FOOTER_SIZE);
}

/** The dynamic header (a view), found through the trailing footer's data offset. */
export function header(image: Buffer): Buffer {
  const at = Number(tailFooter(image).readBigUInt64BE(F.dataOffset));
  return image.subarray(at, at + HEADER_SIZE);
}

export type Which = 'both' | 'head' | 'tail';

/** Apply `edit` to the chosen footer copies, then (by default) make their checksums valid again. */
export function editFooters(image: Buffer, edit: (footer: Buffer) => void, which: Which = 'both', fixChecksum = true): void {
  const copies = which === 'both' ? [headFooter(image), tailFooter(image)] : which === 'head' ? [headFooter(image)] : [tailFooter(image)];
  for (const footer of copies) {
    edit(footer);
    if (fixChecksum) fixFooterChecksum(footer);
  }
}

/** Apply `edit` to the dynamic header, then (by default) make its checksum valid again. */
export function editHeader(image: Buffer, edit: (header: Buffer) => void, fixChecksum = true): void {
  const h = header(image);
  edit(h);
  if (fixChecksum) fixHeaderChecksum(h);
}

export function tableOffset(image: Buffer): number {
  return Number(header(image).readBigUInt64BE(H.tableOffset));
}

export function getBatEntry(image: Buffer, block: number): number {
  return image.readUInt32BE(tableOffset(image) + block * 4);
}

export function setBatEntry(image: Buffer, block: number, sector: number): void {
  image.writeUInt32BE(sector >>> 0, tableOffset(image) + block * 4);
}

/** Parent locator `i` of the header: platform code, data length and data offset. */
export function locator(image: Buffer, i: number): { platform: string; length: number; offset: number } {
  const at = H.locators + i * H.locatorSize;
  const h = header(image);
  return { platform: h.toString('latin1', at, at + 4), length: h.readUInt32BE(at + 8), offset: Number(h.readBigUInt64BE(at + 16)) };
}

/** Read `src`, let `edit` change (or replace) the image, write it to `dst`. */
export async function corruptCopy(src: string, dst: string, edit: (image: Buffer) => void | Buffer): Promise<void> {
  const image = await readFile(src);
  const result = edit(image);
  await writeFile(dst, result ?? image);
}

/** `length` reproducible pseudo-random bytes (SHA-256 in counter mode): garbage that is the same every run. */
export function garbage(length: number, seed = 'vhdvault'): Buffer {
  const out = Buffer.alloc(length);
  for (let i = 0, done = 0; done < length; i++) {
    const chunk = createHash('sha256').update(`${seed}:${i}`).digest();
    done += chunk.copy(out, done);
  }
  return out;
}
