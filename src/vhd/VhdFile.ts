import { type FileHandle, open } from 'node:fs/promises';
import { Bat, batByteSize } from './bat.js';
import { bitmapByteSize, fullBitmap } from './bitmap.js';
import {
  DEFAULT_BLOCK_SIZE,
  FOOTER_SIZE,
  HEADER_SIZE,
  SECTOR_SIZE,
} from './constants.js';
import { type StoredBlock, type WritableVhdDisk, writeSectors } from './disk.js';
import { describeFsError, VaultError } from '../util/errors.js';
import { takeBuffer } from '../util/bufferPool.js';
import { readSmall } from '../util/smallReads.js';
import { type Footer, parseFooter, serializeFooter, virtualSize } from './footer.js';
import { type DynamicHeader, parseHeader } from './header.js';
import { MAX_LOCATOR_BYTES, PLATFORM_NONE } from './parentLocator.js';

export interface OpenOptions {
  writable?: boolean;
  /** Block size used to slice a fixed disk (it has no blocks of its own). */
  fixedBlockSize?: number;
}

async function readExactly(fh: FileHandle, file: string, length: number, position: number, what: string): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  const { bytesRead } = await fh.read(buf, 0, length, position);
  if (bytesRead !== length) throw new VaultError(file, `${what} truncated: file ends ${bytesRead} bytes into it`);
  return buf;
}

/** A VHD stored as one file: fixed (2), dynamic (3) or differencing (4). */
export class VhdFile implements WritableVhdDisk {
  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    private fileSize: number,
    readonly footer: Footer,
    readonly header: DynamicHeader | null,
    private readonly bat: Bat | null,
    readonly blockSize: number,
    private readonly writable: boolean,
  ) {}

  get size(): number {
    return virtualSize(this.footer);
  }

  get blockCount(): number {
    return Math.ceil(this.size / this.blockSize);
  }

  get bitmapSize(): number {
    return bitmapByteSize(this.blockSize);
  }

  /**
   * Open and validate: cookies, checksums, versions, both footer copies equal,
   * block size, table size, every BAT entry inside the file, no overlapping blocks.
   * Parents are not opened here (see VhdChain).
   */
  static async open(path: string, options: OpenOptions = {}): Promise<VhdFile> {
    let fh: FileHandle;
    try {
      fh = await open(path, options.writable ? 'r+' : 'r');
    } catch (err) {
      throw new VaultError(path, describeFsError(err));
    }
    try {
      const stat = await fh.stat();
      if (!stat.isFile()) throw new VaultError(path, 'not a regular file');
      return await VhdFile.validate(path, fh, stat.size, options);
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  private static async validate(path: string, fh: FileHandle, fileSize: number, options: OpenOptions): Promise<VhdFile> {
    if (fileSize < FOOTER_SIZE) throw new VaultError(path, `file is too small to be a VHD (${fileSize} bytes)`);
    if (fileSize % SECTOR_SIZE !== 0) {
      // A 511-byte footer (very old writers) would leave us reading garbage: refuse plainly.
      throw new VaultError(path, `file size ${fileSize} is not a multiple of 512 bytes (truncated?)`);
    }
    const tailBytes = await readExactly(fh, path, FOOTER_SIZE, fileSize - FOOTER_SIZE, 'footer');
    const footer = await parseTrailingFooter(path, fh, tailBytes);
    const size = virtualSize(footer);

    if (footer.diskType === 'fixed') {
      if (fileSize - FOOTER_SIZE < size) {
        throw new VaultError(path, `fixed disk of ${size} bytes needs ${size + FOOTER_SIZE} bytes, file has ${fileSize} (truncated)`);
      }
      const blockSize = options.fixedBlockSize ?? DEFAULT_BLOCK_SIZE;
      return new VhdFile(path, fh, fileSize, footer, null, null, blockSize, options.writable ?? false);
    }

    const headBytes = await readExactly(fh, path, FOOTER_SIZE, 0, 'footer copy');
    parseFooter(headBytes, path, 'footer copy at offset 0');
    if (!headBytes.equals(tailBytes)) throw new VaultError(path, 'footer copy at offset 0 differs from the footer at the end of the file');

    const headerOffset = footer.dataOffset!;
    if (headerOffset + HEADER_SIZE > fileSize - FOOTER_SIZE) {
      throw new VaultError(path, `dynamic header offset ${headerOffset} is past the end of the file`);
    }
    const header = parseHeader(await readExactly(fh, path, HEADER_SIZE, headerOffset, 'dynamic header'), path);
    const { blockSize } = header;
    const blockCount = Math.ceil(size / blockSize);
    if (header.maxTableEntries < blockCount) {
      throw new VaultError(
        path,
        `block allocation table too small: ${header.maxTableEntries} entries of ${blockSize} bytes cover ` +
          `${header.maxTableEntries * blockSize} bytes, the disk is ${size} bytes`,
      );
    }
    const batBytes = batByteSize(header.maxTableEntries);
    if (header.tableOffset + batBytes > fileSize - FOOTER_SIZE) {
      throw new VaultError(path, `block allocation table (${header.maxTableEntries} entries at offset ${header.tableOffset}) extends past the end of the file`);
    }
    const bat = Bat.fromBuffer(blockCount, await readExactly(fh, path, blockCount * 4, header.tableOffset, 'block allocation table'));
    const metadata: Region[] = [
      { start: 0, end: FOOTER_SIZE, what: 'the footer copy' },
      { start: headerOffset, end: headerOffset + HEADER_SIZE, what: 'the dynamic header' },
      { start: header.tableOffset, end: header.tableOffset + batBytes, what: 'the block allocation table' },
    ];
    if (footer.diskType === 'differencing') {
      header.parentLocators.forEach((loc, i) => {
        if (loc.platformCode === PLATFORM_NONE || loc.dataLength === 0) return;
        metadata.push({ start: loc.dataOffset, end: loc.dataOffset + loc.dataLength, what: `parent locator ${i}'s data` });
      });
    }
    checkLayout(path, metadata, blockRegions(path, bat, blockCount, blockSize, fileSize));
    return new VhdFile(path, fh, fileSize, footer, header, bat, blockSize, options.writable ?? false);
  }

  isAllocated(block: number): boolean {
    if (block < 0 || block >= this.blockCount) return false;
    return this.bat === null ? true : this.bat.isAllocated(block);
  }

  allocatedBlocks(): number {
    return this.bat === null ? this.blockCount : this.bat.allocatedCount();
  }

  /** File offset of the block's sector bitmap (dynamic/differencing) or data (fixed). */
  private blockOffset(block: number): number | undefined {
    if (this.bat === null) return block * this.blockSize;
    const sector = this.bat.get(block);
    return sector === undefined ? undefined : sector * SECTOR_SIZE;
  }

  async readBlock(block: number): Promise<StoredBlock | null> {
    if (block < 0 || block >= this.blockCount) return null;
    const offset = this.blockOffset(block);
    if (offset === undefined) return null;
    if (this.bat === null) {
      // Fixed: the last block may be short; the rest of the buffer reads as zeros.
      const data = Buffer.alloc(this.blockSize);
      const length = Math.min(this.blockSize, this.size - offset);
      await this.readFully(data.subarray(0, length), offset, block);
      return { bitmap: fullBitmap(this.blockSize), data };
    }
    const stored = takeBuffer(this.bitmapSize + this.blockSize);
    await this.readFully(stored, offset, block);
    return { bitmap: stored.subarray(0, this.bitmapSize), data: stored.subarray(this.bitmapSize) };
  }

  /** Part of an allocated block's data, read in place (the caller knows the block is allocated). */
  async readBlockRange(block: number, offset: number, length: number): Promise<Buffer> {
    const at = this.blockOffset(block);
    if (at === undefined) throw new RangeError(`block ${block} is not allocated in ${this.path}`);
    const data = Buffer.allocUnsafe(length);
    const position = at + (this.bat === null ? 0 : this.bitmapSize) + offset;
    if ((await readSmall(this.fh, data, position)) !== length) throw new VaultError(this.path, `block ${block} is truncated at offset ${position}`);
    return data;
  }

  /** Whether readBlockRange() reads in place (always, for a file). */
  get rangeReads(): boolean {
    return true;
  }

  /** An allocated block's sector bitmap, or null when the block is not allocated. */
  async readBitmap(block: number): Promise<Buffer | null> {
    const at = this.blockOffset(block);
    if (at === undefined) return null;
    if (this.bat === null) return fullBitmap(this.blockSize);
    const bitmap = Buffer.alloc(this.bitmapSize);
    await this.readFully(bitmap, at, block);
    return bitmap;
  }

  /**
   * Write whole sectors inside one block of a differencing disk and mark them
   * present: the data first, then the bitmap bytes that changed. A block not
   * yet allocated is appended empty (its data region left sparse, reading as
   * zeros). Nothing is synced: call flush() to make the writes durable.
   */
  async writeBlockSectors(block: number, firstSector: number, data: Buffer): Promise<void> {
    if (!this.writable) throw new Error(`${this.path} was opened read-only`);
    if (this.bat === null || this.header === null) throw new VaultError(this.path, 'fixed disks are not written sector by sector');
    const sectors = data.length / SECTOR_SIZE;
    if (!Number.isInteger(sectors) || firstSector < 0 || (firstSector + sectors) * SECTOR_SIZE > this.blockSize) throw new RangeError('sectors outside the block');
    let at = this.blockOffset(block);
    if (at === undefined) {
      at = this.fileSize - FOOTER_SIZE;
      const newEnd = at + this.bitmapSize + this.blockSize;
      await this.fh.write(serializeFooter(this.footer), 0, FOOTER_SIZE, newEnd);
      await this.fh.write(Buffer.alloc(this.bitmapSize), 0, this.bitmapSize, at);
      this.fileSize = newEnd + FOOTER_SIZE;
      this.bat.set(block, at / SECTOR_SIZE);
      const { data: batSector, offset: inTable } = this.bat.sectorOf(block);
      await this.fh.write(batSector, 0, SECTOR_SIZE, this.header.tableOffset + inTable);
    }
    await this.fh.write(data, 0, data.length, at + this.bitmapSize + firstSector * SECTOR_SIZE);
    // The bitmap bytes covering these sectors (8 sectors a byte), read, set, written back.
    const first = Math.floor(firstSector / 8);
    const last = Math.floor((firstSector + sectors - 1) / 8);
    const bytes = Buffer.alloc(last - first + 1);
    await this.readFully(bytes, at + first, block);
    for (let s = firstSector; s < firstSector + sectors; s++) bytes[Math.floor(s / 8) - first]! |= 0x80 >> s % 8;
    await this.fh.write(bytes, 0, bytes.length, at + first);
  }

  private async readFully(target: Buffer, position: number, block: number): Promise<void> {
    let done = 0;
    while (done < target.length) {
      const { bytesRead } = await this.fh.read(target, done, target.length - done, position + done);
      if (bytesRead === 0) throw new VaultError(this.path, `block ${block} is truncated at offset ${position + done}`);
      done += bytesRead;
    }
  }

  /**
   * Store a whole block with its sector bitmap (default: every sector present).
   * A new block is appended where the trailing footer was: the footer is first
   * rewritten past the new block, then the data, then the BAT entry, so a crash
   * at any point leaves a valid file (at worst with an unreferenced block).
   * With `sync: false` the fdatasyncs between those steps are skipped (call
   * flush() at the end): only for writers that can redo all their writes after
   * a power loss, like a journaled merge.
   */
  async writeBlock(block: number, data: Buffer, bitmap: Buffer = fullBitmap(this.blockSize), options: { sync?: boolean } = {}): Promise<void> {
    const sync = options.sync ?? true;
    if (!this.writable) throw new Error(`${this.path} was opened read-only`);
    if (this.bat === null || this.header === null) throw new VaultError(this.path, 'fixed disks are written through convert, not block by block');
    if (block < 0 || block >= this.blockCount) throw new RangeError(`block ${block} outside disk of ${this.blockCount} blocks`);
    if (data.length !== this.blockSize) throw new RangeError(`block data must be ${this.blockSize} bytes, got ${data.length}`);
    if (bitmap.length !== this.bitmapSize) throw new RangeError(`bitmap must be ${this.bitmapSize} bytes, got ${bitmap.length}`);

    const existing = this.blockOffset(block);
    if (existing !== undefined) {
      await this.fh.writev([bitmap, data], existing);
      if (sync) await this.fh.datasync();
      return;
    }
    const offset = this.fileSize - FOOTER_SIZE;
    const newEnd = offset + this.bitmapSize + this.blockSize;
    await this.fh.write(serializeFooter(this.footer), 0, FOOTER_SIZE, newEnd);
    await this.fh.writev([bitmap, data], offset);
    if (sync) await this.fh.datasync();
    this.fileSize = newEnd + FOOTER_SIZE;
    this.bat.set(block, offset / SECTOR_SIZE);
    const { data: batSector, offset: inTable } = this.bat.sectorOf(block);
    await this.fh.write(batSector, 0, SECTOR_SIZE, this.header.tableOffset + inTable);
    if (sync) await this.fh.datasync();
  }

  /**
   * Cut off what no BAT entry references at the end of the file (a block an
   * interrupted append left there), moving the trailing footer back over it.
   * For a writer resuming after a crash, before it appends again.
   */
  async trimUnreferencedTail(): Promise<void> {
    if (!this.writable) throw new Error(`${this.path} was opened read-only`);
    if (this.bat === null || this.header === null) return;
    const roundUp = (n: number) => Math.ceil(n / SECTOR_SIZE) * SECTOR_SIZE;
    let end = Math.max(this.footer.dataOffset! + HEADER_SIZE, this.header.tableOffset + batByteSize(this.header.maxTableEntries));
    for (const loc of this.header.parentLocators) {
      if (loc.platformCode !== PLATFORM_NONE && loc.dataLength > 0) end = Math.max(end, roundUp(loc.dataOffset + loc.dataLength));
    }
    for (let b = 0; b < this.blockCount; b++) {
      const offset = this.blockOffset(b);
      if (offset !== undefined) end = Math.max(end, offset + this.bitmapSize + this.blockSize);
    }
    if (end + FOOTER_SIZE >= this.fileSize) return;
    await this.fh.write(serializeFooter(this.footer), 0, FOOTER_SIZE, end);
    await this.fh.truncate(end + FOOTER_SIZE);
    await this.fh.datasync();
    this.fileSize = end + FOOTER_SIZE;
  }

  /** Make every write so far durable (after writeBlock calls with `sync: false`). */
  async flush(): Promise<void> {
    await this.fh.sync();
  }

  async writeSectors(diskOffset: number, bytes: Buffer): Promise<void> {
    await writeSectors(this, diskOffset, bytes);
  }

  async readLocatorData(index: number): Promise<Buffer | null> {
    const locator = this.header?.parentLocators[index];
    if (!locator || locator.platformCode === PLATFORM_NONE || locator.dataLength === 0 || locator.dataLength > MAX_LOCATOR_BYTES) return null;
    if (locator.dataOffset + locator.dataLength > this.fileSize - FOOTER_SIZE) return null;
    const buf = Buffer.alloc(locator.dataLength);
    const { bytesRead } = await this.fh.read(buf, 0, locator.dataLength, locator.dataOffset);
    return bytesRead === locator.dataLength ? buf : null;
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

/** The footer at the end; when only the copy at offset 0 is sound, say the file was cut short. */
async function parseTrailingFooter(path: string, fh: FileHandle, tailBytes: Buffer): Promise<Footer> {
  try {
    return parseFooter(tailBytes, path, 'footer at end of file');
  } catch (tailError) {
    const head = Buffer.alloc(FOOTER_SIZE);
    await fh.read(head, 0, FOOTER_SIZE, 0);
    let headIsSound = false;
    try {
      headIsSound = parseFooter(head, path).diskType !== 'fixed';
    } catch {
      // neither copy is sound: report the trailing one
    }
    if (headIsSound) throw new VaultError(path, 'truncated or damaged: no valid footer at the end of the file (the copy at offset 0 is valid)');
    throw tailError;
  }
}

interface Region {
  start: number;
  end: number;
  what: string;
}

/** Every allocated block's stored form (bitmap + data), which must end before the trailing footer. */
function blockRegions(path: string, bat: Bat, blockCount: number, blockSize: number, fileSize: number): Region[] {
  const stored = bitmapByteSize(blockSize) + blockSize;
  const dataEnd = fileSize - FOOTER_SIZE;
  const regions: Region[] = [];
  for (let block = 0; block < blockCount; block++) {
    const sector = bat.get(block);
    if (sector === undefined) continue;
    const start = sector * SECTOR_SIZE;
    if (start + stored > dataEnd) {
      throw new VaultError(path, `BAT entry for block ${block} points to offset ${start}, past the end of the file's data (${dataEnd} bytes)`);
    }
    regions.push({ start, end: start + stored, what: `block ${block}` });
  }
  return regions;
}

/** No two regions of the file (metadata structures, locator data, blocks) may share a byte. */
function checkLayout(path: string, metadata: Region[], blocks: Region[]): void {
  const all = [...metadata, ...blocks].sort((a, b) => a.start - b.start || a.end - b.end);
  // Sorted by start, a region overlaps some earlier one iff it starts before the furthest end so far.
  let furthest: Region | undefined;
  for (const region of all) {
    if (furthest !== undefined && region.start < furthest.end) {
      throw new VaultError(path, `${furthest.what} and ${region.what} overlap (offsets ${furthest.start} and ${region.start})`);
    }
    if (furthest === undefined || region.end > furthest.end) furthest = region;
  }
}
