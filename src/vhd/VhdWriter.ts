import { Bat, batByteSize } from './bat.js';
import { bitmapByteSize, fullBitmap } from './bitmap.js';
import { BAT_OFFSET, DEFAULT_BLOCK_SIZE, FOOTER_SIZE, HEADER_OFFSET, SECTOR_SIZE } from './constants.js';
import { type Footer, newFooter, serializeFooter } from './footer.js';
import { type DynamicHeader, newHeader, serializeHeader } from './header.js';
import { encodeLocatorPath, PLATFORM_NONE, PLATFORM_W2KU, PLATFORM_W2RU } from './parentLocator.js';
import { validateBlockSize, validateDiskSize, validateTable } from './limits.js';
import { AtomicFile } from '../util/fsync.js';

/** What a differencing disk records about its parent. */
export interface ParentLink {
  uuid: string;
  /** The parent footer's timestamp (VHD seconds). */
  timestamp: number;
  /** Path from the child's directory to the parent (parent unicode name, W2ru locator). */
  relativePath: string;
  /** Absolute path of the parent (W2ku locator); left out where only relative paths may be followed. */
  absolutePath?: string;
}

export interface WriterOptions {
  size: number;
  blockSize?: number;
  parent?: ParentLink;
  uuid?: string;
}

export interface DiskMetadata {
  footer: Footer;
  header: DynamicHeader;
  /** Data of the parent locators in use (entries 0…n-1 of the header), offsets still 0. */
  locatorData: Buffer[];
}

/**
 * Footer, header and parent locators of a new dynamic or differencing disk,
 * whatever its storage: W2ru (relative) in entry 0 and W2ku (absolute) in entry 1.
 */
export function newDiskMetadata(options: WriterOptions): DiskMetadata {
  const blockSize = options.blockSize ?? DEFAULT_BLOCK_SIZE;
  validateDiskSize(options.size);
  validateBlockSize(blockSize);
  const footer = newFooter(options.parent ? 'differencing' : 'dynamic', options.size, options.uuid);
  const header = newHeader(Math.ceil(options.size / blockSize), blockSize);
  const locatorData: Buffer[] = [];
  if (options.parent) {
    const p = options.parent;
    header.parentUuid = p.uuid;
    header.parentTimestamp = p.timestamp;
    header.parentName = p.relativePath;
    const locators: Array<[string, string]> = [[PLATFORM_W2RU, p.relativePath]];
    if (p.absolutePath !== undefined) locators.push([PLATFORM_W2KU, p.absolutePath]);
    for (const [platformCode, path] of locators) {
      const data = encodeLocatorPath(path);
      const dataSpace = Math.max(SECTOR_SIZE, Math.ceil(data.length / SECTOR_SIZE) * SECTOR_SIZE);
      header.parentLocators[locatorData.length] = { platformCode, dataSpace, dataLength: data.length, dataOffset: 0 };
      locatorData.push(data);
    }
  }
  const locatorBytes = header.parentLocators.reduce((n, l) => n + (l.platformCode === PLATFORM_NONE ? 0 : l.dataSpace), 0);
  validateTable(options.size, blockSize, BAT_OFFSET + batByteSize(header.maxTableEntries) + locatorBytes);
  return { footer, header, locatorData };
}

/**
 * Writes a new dynamic or differencing VHD in one pass: blocks are appended in
 * the order given while the BAT is kept in memory; metadata and both footers are
 * written by finish(), which then renames the temporary file into place. Until
 * then the target name is untouched.
 */
export class DynamicVhdWriter {
  private nextOffset: number;
  private finished = false;

  private constructor(
    private readonly file: AtomicFile,
    readonly footer: Footer,
    readonly header: DynamicHeader,
    private readonly bat: Bat,
    private readonly locatorData: Buffer[],
    firstBlockOffset: number,
  ) {
    this.nextOffset = firstBlockOffset;
  }

  static async create(target: string, options: WriterOptions): Promise<DynamicVhdWriter> {
    const { footer, header, locatorData } = newDiskMetadata(options);
    // Locator data goes between the BAT and the first block.
    let offset = BAT_OFFSET + batByteSize(header.maxTableEntries);
    for (const loc of header.parentLocators.slice(0, locatorData.length)) {
      loc.dataOffset = offset;
      offset += loc.dataSpace;
    }
    return new DynamicVhdWriter(await AtomicFile.create(target), footer, header, Bat.empty(header.maxTableEntries), locatorData, offset);
  }

  get blockSize(): number {
    return this.header.blockSize;
  }

  /** Append a block (data is exactly blockSize bytes). Each block may be written once. */
  async writeBlock(block: number, data: Buffer, bitmap: Buffer = fullBitmap(this.blockSize)): Promise<void> {
    if (block < 0 || block >= this.bat.entries) throw new RangeError(`block ${block} outside disk of ${this.bat.entries} blocks`);
    if (this.bat.isAllocated(block)) throw new Error(`block ${block} written twice`);
    if (data.length !== this.blockSize) throw new RangeError(`block data must be ${this.blockSize} bytes`);
    const offset = this.nextOffset;
    this.nextOffset += bitmapByteSize(this.blockSize) + this.blockSize;
    this.bat.set(block, offset / SECTOR_SIZE);
    await this.file.handle.writev([bitmap, data], offset);
    this.file.wrote(bitmap.length + data.length);
  }

  /** Write metadata and footers, fsync, and rename into place. */
  async finish(): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    const fh = this.file.handle;
    await this.file.commit(async () => {
      const footer = serializeFooter(this.footer);
      await fh.write(footer, 0, FOOTER_SIZE, 0);
      await fh.write(serializeHeader(this.header), 0, undefined, HEADER_OFFSET);
      await fh.write(this.bat.toBuffer(), 0, undefined, this.header.tableOffset);
      for (let i = 0; i < this.locatorData.length; i++) {
        const loc = this.header.parentLocators[i]!;
        const padded = Buffer.alloc(loc.dataSpace);
        this.locatorData[i]!.copy(padded);
        await fh.write(padded, 0, undefined, loc.dataOffset);
      }
      await fh.write(footer, 0, FOOTER_SIZE, this.nextOffset);
    });
  }

  /** Drop the temporary file; the target is left as it was. */
  async abort(): Promise<void> {
    this.finished = true;
    await this.file.abort();
  }
}
