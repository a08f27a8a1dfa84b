import { constants } from 'node:fs';
import { type FileHandle, mkdir, open, rename, stat } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import pLimit from 'p-limit';
import { bitmapByteSize, fullBitmap, setBit, testBit } from './bitmap.js';
import { type Compression, compress, decompress, isCompression } from './compression.js';
import { FOOTER_SIZE, HEADER_SIZE } from './constants.js';
import { type StoredBlock, type WritableVhdDisk, writeSectors } from './disk.js';
import { describeFsError, VaultError } from '../util/errors.js';
import { type Footer, parseFooter, serializeFooter, virtualSize } from './footer.js';
import { type DynamicHeader, LOCATOR_COUNT, parseHeader, serializeHeader } from './header.js';
import { MAX_LOCATOR_BYTES, PLATFORM_NONE } from './parentLocator.js';
import { newDiskMetadata, type WriterOptions } from './VhdWriter.js';
import { pathExists } from '../util/files.js';
import { looksSealed } from '../util/sealedMagic.js';
import type { ChunkSeal } from './chunkSeal.js';
import { OpenFiles } from '../util/smallReads.js';
import { releaseBuffer, takeBuffer } from '../util/bufferPool.js';
import { AtomicFile, cleanUpAfter, fsyncDirectory, removeStaged, syncFilesystem, temporaryPath } from '../util/fsync.js';

/**
 * The exploded layout (Xen Orchestra vhd-lib's VhdDirectory): a directory with
 * `footer`, `header`, `bat` (bit array, MSB first), `parentLocatorEntry<i>`,
 * `blocks/<floor(id/1000)>/<id%1000>` (bitmap + block) and an optional
 * `chunk-filters.json` naming the codec every one of those files is stored with.
 */
export const FOOTER_FILE = 'footer';
export const HEADER_FILE = 'header';
export const BAT_FILE = 'bat';
export const CHUNK_FILTERS_FILE = 'chunk-filters.json';
export const locatorFile = (index: number) => `parentLocatorEntry${index}`;

/** `blocks/1/234` for block 1234: at most 1000 files per folder. */
/**
 * Block files read in place (readBlockRange) stay open here between reads:
 * up to 1024 (2 GiB of blocks), well inside the descriptor limit Node starts with.
 */
const openBlockFiles = new OpenFiles(1024);

export function blockFile(block: number): string {
  return `blocks/${Math.floor(block / 1000)}/${block % 1000}`;
}

/** Bytes of our `bat`: one bit per block. vhd-lib writes one byte per entry; both read the same bits. */
export function batBitsSize(entries: number): number {
  return Math.ceil(entries / 8);
}

/** Compressed files may be a little larger than their content; anything far larger is hostile. */
const storedLimit = (contentLength: number, codec: Compression) =>
  codec === 'none' ? contentLength : contentLength + (contentLength >> 3) + 65536;

/** What sealing adds to a file (envelope header, nonce and tag). */
const SEALED_SLACK = 64;

/** A file's stored bytes (opened, when the directory is sealed), at most `limit` of them before sealing. */
async function readStored(dir: string, name: string, limit: number, seal: ChunkSeal | undefined): Promise<Buffer> {
  const file = join(dir, name);
  let stored: Buffer;
  try {
    // Opened without waiting (a FIFO put there must not hang us), then checked: four calls, where stat and readFile took nine.
    const fh = await open(file, constants.O_RDONLY | constants.O_NONBLOCK);
    try {
      const s = await fh.stat();
      if (!s.isFile()) throw new VaultError(file, 'is not a regular file');
      // Unsealed, a sealed file's few extra bytes are read too: it is then named for what it is.
      if (s.size > limit + (seal?.overhead ?? SEALED_SLACK)) throw new VaultError(file, `is ${s.size} bytes, more than its content can be (${limit} bytes${seal ? `, ${limit + seal.overhead} sealed` : ''})`);
      stored = await readAll(fh, s.size);
    } finally {
      await fh.close();
    }
  } catch (err) {
    if (err instanceof VaultError) throw err;
    throw new VaultError(file, (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'is missing' : describeFsError(err));
  }
  if (seal) return seal.open(name, stored, file);
  if (looksSealed(stored)) throw new VaultError(file, 'is sealed: it belongs to an encrypted repository (read its backups with vhdvault restore)');
  if (stored.length > limit) throw new VaultError(file, `is ${stored.length} bytes, more than its content can be (${limit} bytes)`);
  return stored;
}

/** The first `size` bytes of an open file in as few reads as it takes (one, for a regular file), fewer at its end. */
async function readAll(fh: FileHandle, size: number): Promise<Buffer> {
  const out = Buffer.allocUnsafe(size);
  let n = 0;
  while (n < size) {
    const { bytesRead } = await fh.read(out, n, size - n, n);
    if (bytesRead === 0) break;
    n += bytesRead;
  }
  return n === size ? out : out.subarray(0, n);
}

/** Read one stored file of a VHD directory, decompressed, at most `maxLength` bytes of content. */
async function readChunk(dir: string, name: string, codec: Compression, maxLength: number, seal?: ChunkSeal): Promise<Buffer> {
  const file = join(dir, name);
  const stored = await readStored(dir, name, storedLimit(maxLength, codec), seal);
  try {
    return await decompress(codec, stored, maxLength);
  } catch (err) {
    const tooLong = (err as NodeJS.ErrnoException).code === 'ERR_BUFFER_TOO_LARGE' || /larger than|maxOutputLength/i.test(String(err));
    throw new VaultError(file, tooLong ? `decompresses to more than ${maxLength} bytes` : `cannot be decompressed as ${codec}: ${(err as Error).message}`);
  }
}

/** The codec named by `chunk-filters.json`: absent, `[]` or `["none"]` mean none. */
export async function readChunkFilters(dir: string, seal?: ChunkSeal): Promise<Compression> {
  const file = join(dir, CHUNK_FILTERS_FILE);
  let text: string;
  try {
    text = (await readStored(dir, CHUNK_FILTERS_FILE, 4096, seal)).toString('utf8');
  } catch (err) {
    if (err instanceof VaultError && err.problem === 'is missing') return 'none';
    throw err;
  }
  let filters: unknown;
  try {
    filters = JSON.parse(text);
  } catch {
    throw new VaultError(file, 'is not valid JSON');
  }
  if (!Array.isArray(filters) || filters.length > 1 || (filters.length === 1 && !isCompression(filters[0]))) {
    throw new VaultError(file, `unsupported chunk filters ${JSON.stringify(filters).slice(0, 80)} (expected [], ["gzip"] or ["brotli"])`);
  }
  return filters.length === 0 ? 'none' : (filters[0] as Compression);
}

/** Write a small file durably under its final name (temporary name, fsync, rename). */
async function writeChunkAtomically(dir: string, name: string, content: Buffer | string): Promise<void> {
  const file = await AtomicFile.create(join(dir, name));
  await file.commit(async () => {
    await file.handle.writeFile(content);
  });
}

/** A VHD stored as a directory (dynamic or differencing). */
export class VhdDirectory implements WritableVhdDisk {
  private constructor(
    readonly path: string,
    readonly footer: Footer,
    readonly header: DynamicHeader,
    private readonly bat: Buffer,
    readonly compression: Compression,
    private readonly writable: boolean,
    private readonly seal: ChunkSeal | undefined,
  ) {}

  get size(): number {
    return virtualSize(this.footer);
  }

  get blockSize(): number {
    return this.header.blockSize;
  }

  get blockCount(): number {
    return Math.ceil(this.size / this.blockSize);
  }

  get storedBlockSize(): number {
    return bitmapByteSize(this.blockSize) + this.blockSize;
  }

  /** `seal`: the directory's files are sealed (an encrypted repository's). */
  static async open(path: string, options: { writable?: boolean; seal?: ChunkSeal } = {}): Promise<VhdDirectory> {
    const seal = options.seal;
    const s = await stat(path).catch((err: unknown) => {
      throw new VaultError(path, describeFsError(err));
    });
    if (!s.isDirectory()) throw new VaultError(path, 'is not a directory');
    const codec = await readChunkFilters(path, seal);
    if (!(await pathExists(join(path, FOOTER_FILE)))) {
      throw new VaultError(path, 'is not a VHD directory (it has no footer file)');
    }
    const footerBytes = await readChunk(path, FOOTER_FILE, codec, FOOTER_SIZE, seal);
    if (footerBytes.length !== FOOTER_SIZE) throw new VaultError(join(path, FOOTER_FILE), `is ${footerBytes.length} bytes, expected ${FOOTER_SIZE}`);
    const footer = parseFooter(footerBytes, join(path, FOOTER_FILE));
    if (footer.diskType === 'fixed') throw new VaultError(join(path, FOOTER_FILE), 'declares a fixed disk, which a VHD directory cannot hold');
    const headerBytes = await readChunk(path, HEADER_FILE, codec, HEADER_SIZE, seal);
    if (headerBytes.length !== HEADER_SIZE) throw new VaultError(join(path, HEADER_FILE), `is ${headerBytes.length} bytes, expected ${HEADER_SIZE}`);
    const header = parseHeader(headerBytes, join(path, HEADER_FILE));
    const size = virtualSize(footer);
    const blockCount = Math.ceil(size / header.blockSize);
    if (header.maxTableEntries < blockCount) {
      throw new VaultError(join(path, HEADER_FILE), `block allocation table too small: ${header.maxTableEntries} entries for ${blockCount} blocks`);
    }
    // vhd-lib's bat has one byte per table entry; ours one bit per block. Accept either.
    const bat = await readChunk(path, BAT_FILE, codec, Math.max(header.maxTableEntries, batBitsSize(blockCount)), seal);
    if (bat.length < batBitsSize(blockCount)) {
      throw new VaultError(join(path, BAT_FILE), `is ${bat.length} bytes, too short for ${blockCount} blocks (${batBitsSize(blockCount)} bytes)`);
    }
    return new VhdDirectory(path, footer, header, bat, codec, options.writable ?? false, seal);
  }

  isAllocated(block: number): boolean {
    return block >= 0 && block < this.blockCount && testBit(this.bat, block);
  }

  allocatedBlocks(): number {
    let n = 0;
    for (let b = 0; b < this.blockCount; b++) if (testBit(this.bat, b)) n++;
    return n;
  }

  async readBlock(block: number): Promise<StoredBlock | null> {
    if (!this.isAllocated(block)) return null;
    const name = blockFile(block);
    let stored: Buffer;
    try {
      stored = (this.rangeReads ? await this.readPlainBlockFile(name) : null) ?? (await readChunk(this.path, name, this.compression, this.storedBlockSize, this.seal));
    } catch (err) {
      if (!(err instanceof VaultError)) throw err;
      const problem = err.problem === 'is missing' ? 'is missing although the bat marks the block present' : err.problem;
      throw new VaultError(this.path, `block ${block} (${name}) ${problem}`);
    }
    if (stored.length !== this.storedBlockSize) {
      throw new VaultError(this.path, `block ${block} (${name}) is ${stored.length} bytes, expected ${this.storedBlockSize} (bitmap + block)`);
    }
    const bitmapSize = bitmapByteSize(this.blockSize);
    return { bitmap: stored.subarray(0, bitmapSize), data: stored.subarray(bitmapSize) };
  }

  /**
   * An uncompressed, unsealed block file read with one read into a recycled
   * buffer (readFile's stat, fresh buffer and 512 KiB reads cost a restore about
   * a third of its main-thread time). Null when the file is not exactly a stored
   * block, or looks sealed: readChunk then reads it and names what is wrong.
   */
  private async readPlainBlockFile(name: string): Promise<Buffer | null> {
    // One byte more than a block: a longer file shows by filling it, and a
    // file of the right size is read whole by its first read (no read at its end).
    const buffer = takeBuffer(this.storedBlockSize + 1);
    let fh: FileHandle;
    try {
      fh = await open(join(this.path, name), 'r');
    } catch {
      releaseBuffer(buffer);
      return null;
    }
    try {
      let n = 0;
      while (n < this.storedBlockSize) {
        const { bytesRead } = await fh.read(buffer, n, buffer.length - n, n);
        if (bytesRead === 0) break;
        n += bytesRead;
      }
      const stored = buffer.subarray(0, this.storedBlockSize);
      if (n === this.storedBlockSize && !looksSealed(stored)) return stored;
    } catch {
      // Unreadable here: readChunk reads it again and names the problem.
    } finally {
      await fh.close();
    }
    releaseBuffer(buffer);
    return null;
  }

  /** Whether readBlockRange() reads in place: only uncompressed, unsealed block files can be read at an offset. */
  get rangeReads(): boolean {
    return this.compression === 'none' && !this.seal;
  }

  /** Part of an allocated block's data, read in place from its file (uncompressed directories only). */
  async readBlockRange(block: number, offset: number, length: number): Promise<Buffer> {
    if (!this.rangeReads) throw new Error(`${this.path}: compressed or sealed blocks are read whole`);
    const name = blockFile(block);
    const data = Buffer.allocUnsafe(length);
    const n = await openBlockFiles.read(join(this.path, name), data, bitmapByteSize(this.blockSize) + offset).catch((err: unknown) => {
      throw new VaultError(this.path, `block ${block} (${name}): ${describeFsError(err)}`);
    });
    if (n !== length) throw new VaultError(this.path, `block ${block} (${name}) is shorter than a stored block`);
    return data;
  }

  async readLocatorData(index: number): Promise<Buffer | null> {
    const loc = this.header.parentLocators[index];
    if (!loc || loc.platformCode === PLATFORM_NONE || loc.dataLength === 0 || loc.dataLength > MAX_LOCATOR_BYTES) return null;
    try {
      const data = await readChunk(this.path, locatorFile(index), this.compression, MAX_LOCATOR_BYTES, this.seal);
      return data.subarray(0, loc.dataLength);
    } catch {
      return null;
    }
  }

  /** Read every block the bat marks present: the deep part of `vhd check`. */
  async verifyBlocks(): Promise<void> {
    // Each check drops its block once read: memory stays at the 8 blocks in flight.
    const limit = pLimit(8);
    const checks: Array<Promise<void>> = [];
    for (let b = 0; b < this.blockCount; b++) {
      if (this.isAllocated(b)) checks.push(limit(async () => void (await this.readBlock(b))));
    }
    await Promise.all(checks);
  }

  /**
   * Store a block: its file is written under a temporary name, fsynced and
   * renamed into place; a newly present block is then recorded in the bat
   * (also replaced atomically), so the bat never names a block not yet durable.
   */
  async writeBlock(block: number, data: Buffer, bitmap: Buffer = fullBitmap(this.blockSize)): Promise<void> {
    if (!this.writable) throw new Error(`${this.path} was opened read-only`);
    if (block < 0 || block >= this.blockCount) throw new RangeError(`block ${block} outside disk of ${this.blockCount} blocks`);
    if (data.length !== this.blockSize || bitmap.length !== bitmapByteSize(this.blockSize)) throw new RangeError('block or bitmap of the wrong size');
    await writeBlockFile(this.path, block, this.sealed(blockFile(block), await compress(this.compression, Buffer.concat([bitmap, data]))));
    if (!testBit(this.bat, block)) {
      setBit(this.bat, block);
      await writeChunkAtomically(this.path, BAT_FILE, this.sealed(BAT_FILE, await compress(this.compression, this.bat)));
    }
  }

  async writeSectors(diskOffset: number, bytes: Buffer): Promise<void> {
    await writeSectors(this, diskOffset, bytes);
  }

  private sealed(name: string, stored: Buffer): Buffer {
    return this.seal ? this.seal.seal(name, stored) : stored;
  }

  async close(): Promise<void> {
    // Only block files read in place stay open (in a cache shared by every directory).
    openBlockFiles.closeUnder(join(this.path, '/'));
  }
}

/** Write `blocks/<a>/<b>` (its stored bytes) durably: temporary name, fsync, rename. */
async function writeBlockFile(dir: string, block: number, stored: Buffer): Promise<void> {
  const target = join(dir, blockFile(block));
  // A folder made here must itself be durable before the bat can name a block inside it.
  const created = await mkdir(dirname(target), { recursive: true });
  if (created !== undefined) {
    for (let folder = dirname(target); folder !== dirname(created); folder = dirname(folder)) await fsyncDirectory(dirname(folder));
  }
  await writeChunkAtomically(dirname(target), String(block % 1000), stored);
}

export interface DirectoryWriterOptions extends WriterOptions {
  compression?: Compression;
  /** Blocks compressed and written at once. */
  concurrency?: number;
  /** Seal every file (an encrypted repository's directory). */
  seal?: ChunkSeal;
}

/**
 * Writes a new VHD directory: everything goes into a temporary sibling
 * directory, every file is fsynced, and finish() renames it into place. The
 * target must not exist yet.
 */
export class VhdDirectoryWriter {
  private readonly bat: Buffer;
  private readonly pending = new Set<Promise<void>>();
  private readonly folders = new Set<number>();
  private failure: unknown = null;
  private readonly concurrency: number;

  private constructor(
    readonly target: string,
    private readonly temp: string,
    readonly footer: Footer,
    readonly header: DynamicHeader,
    private readonly locatorData: Buffer[],
    readonly compression: Compression,
    concurrency: number,
    private readonly seal: ChunkSeal | undefined,
  ) {
    this.bat = Buffer.alloc(batBitsSize(header.maxTableEntries));
    this.concurrency = concurrency;
  }

  static async create(target: string, options: DirectoryWriterOptions): Promise<VhdDirectoryWriter> {
    const { footer, header, locatorData } = newDiskMetadata(options);
    if (await pathExists(target)) throw new VaultError(target, 'already exists: choose a new name for the directory');
    const temp = temporaryPath(target);
    await mkdir(join(temp, 'blocks'), { recursive: true });
    return new VhdDirectoryWriter(target, temp, footer, header, locatorData, options.compression ?? 'none', options.concurrency ?? 4, options.seal);
  }

  get blockSize(): number {
    return this.header.blockSize;
  }

  /** Queue a block; resolves once it is accepted (backpressure past `concurrency` blocks in flight). */
  async writeBlock(block: number, data: Buffer, bitmap: Buffer = fullBitmap(this.blockSize)): Promise<void> {
    if (this.failure) throw this.failure;
    if (block < 0 || block >= this.header.maxTableEntries) throw new RangeError(`block ${block} outside the disk`);
    if (testBit(this.bat, block)) throw new Error(`block ${block} written twice`);
    setBit(this.bat, block);
    await this.prepareBlockFile(block);
    const job = this.storeBlock(block, Buffer.concat([bitmap, data])).catch((err: unknown) => {
      this.failure ??= err;
    });
    this.pending.add(job);
    void job.finally(() => this.pending.delete(job));
    while (this.pending.size >= this.concurrency) await Promise.race(this.pending);
    if (this.failure) throw this.failure;
  }

  /** The folder the directory is written in until finish(): a sibling of the target. */
  get stagingName(): string {
    return basename(this.temp);
  }

  /**
   * Make the folder of block `block`'s file, so that another writer (a worker
   * thread) may create the file, already compressed, at its name below the
   * staging folder (blockFile). Call adoptBlock() once it is durable.
   */
  async prepareBlockFile(block: number): Promise<void> {
    const folder = Math.floor(block / 1000);
    if (!this.folders.has(folder)) {
      this.folders.add(folder);
      await mkdir(join(this.temp, 'blocks', String(folder)), { recursive: true });
    }
  }

  adoptBlock(block: number): void {
    if (testBit(this.bat, block)) throw new Error(`block ${block} written twice`);
    setBit(this.bat, block);
  }

  private async storeBlock(block: number, stored: Buffer): Promise<void> {
    await this.writeFile(blockFile(block), await compress(this.compression, stored));
  }

  /** Files are flushed together by finish(), before the rename that publishes them. */
  private async writeFile(name: string, content: Buffer | string): Promise<void> {
    const fh = await open(join(this.temp, name), 'wx');
    try {
      await fh.writeFile(this.seal ? this.seal.seal(name, Buffer.from(content)) : content);
    } finally {
      await fh.close();
    }
  }

  /** Metadata files, one filesystem flush, then the rename that makes the directory exist. */
  async finish(): Promise<void> {
    try {
      await Promise.all(this.pending);
      if (this.failure) throw this.failure;
      const c = this.compression;
      for (let i = 0; i < this.locatorData.length && i < LOCATOR_COUNT; i++) {
        await this.writeFile(locatorFile(i), await compress(c, this.locatorData[i]!));
      }
      await this.writeFile(HEADER_FILE, await compress(c, serializeHeader(this.header)));
      await this.writeFile(BAT_FILE, await compress(c, this.bat));
      if (c !== 'none') await this.writeFile(CHUNK_FILTERS_FILE, JSON.stringify([c]));
      await this.writeFile(FOOTER_FILE, await compress(c, serializeFooter(this.footer)));
      // One flush of the filesystem makes every file and folder above durable.
      await syncFilesystem(this.temp);
      await rename(this.temp, this.target);
      await fsyncDirectory(dirname(this.target));
    } catch (err) {
      throw await cleanUpAfter(err, () => this.abort());
    }
  }

  async abort(): Promise<void> {
    await Promise.allSettled(this.pending);
    await removeStaged(this.temp);
  }
}
