import { FOOTER_SIZE } from './constants.js';
import { newFooter, serializeFooter } from './footer.js';
import { openSource, type BlockSource } from './source.js';
import { DynamicVhdWriter } from './VhdWriter.js';
import type { Compression } from './compression.js';
import { VhdDirectoryWriter } from './VhdDirectory.js';
import { AtomicFile } from '../util/fsync.js';
import { BLOCK_READ_AHEAD, forEachOrdered } from '../util/pipeline.js';
import { isAllZero } from '../util/zero.js';
import { releaseBuffer } from '../util/bufferPool.js';

export type OutputFormat = 'vhd' | 'fixed' | 'raw' | 'dir';

/** Receives a disk's blocks in order; nothing is visible at the target until finish(). */
export interface DiskWriter {
  writeBlock(block: number, data: Buffer): Promise<void>;
  finish(): Promise<void>;
  abort(): Promise<void>;
}

/** Dynamic VHD output, as a file or a directory: all-zero blocks stay unallocated. */
class DynamicDiskWriter implements DiskWriter {
  constructor(private readonly vhd: DynamicVhdWriter | VhdDirectoryWriter) {}
  async writeBlock(block: number, data: Buffer): Promise<void> {
    if (!isAllZero(data)) await this.vhd.writeBlock(block, data);
  }
  finish(): Promise<void> {
    return this.vhd.finish();
  }
  abort(): Promise<void> {
    return this.vhd.abort();
  }
}

/**
 * Raw output (exactly `size` bytes) or a fixed VHD (raw plus a footer).
 * Zero blocks are never written, so they stay holes in the sparse file.
 */
class FlatDiskWriter implements DiskWriter {
  private constructor(
    private readonly file: AtomicFile,
    private readonly size: number,
    private readonly blockSize: number,
    private readonly footer: Buffer | null,
  ) {}

  static async create(target: string, size: number, blockSize: number, fixedVhd: boolean): Promise<FlatDiskWriter> {
    const file = await AtomicFile.create(target);
    const footer = fixedVhd ? serializeFooter(newFooter('fixed', size)) : null;
    try {
      await file.handle.truncate(size + (footer ? FOOTER_SIZE : 0));
    } catch (err) {
      await file.abort();
      throw err;
    }
    return new FlatDiskWriter(file, size, blockSize, footer);
  }

  async writeBlock(block: number, data: Buffer): Promise<void> {
    if (isAllZero(data)) return;
    const offset = block * this.blockSize;
    const length = Math.min(this.blockSize, this.size - offset);
    await this.file.handle.write(data, 0, length, offset);
    this.file.wrote(length);
  }

  finish(): Promise<void> {
    const footer = this.footer;
    return this.file.commit(async () => {
      if (footer) await this.file.handle.write(footer, 0, FOOTER_SIZE, this.size);
    });
  }

  abort(): Promise<void> {
    return this.file.abort();
  }
}

export async function createDiskWriter(
  target: string,
  format: OutputFormat,
  size: number,
  blockSize: number,
  compression: Compression = 'none',
): Promise<DiskWriter> {
  if (format === 'vhd') return new DynamicDiskWriter(await DynamicVhdWriter.create(target, { size, blockSize }));
  if (format === 'dir') return new DynamicDiskWriter(await VhdDirectoryWriter.create(target, { size, blockSize, compression }));
  return FlatDiskWriter.create(target, size, blockSize, format === 'fixed');
}

export interface CopyStats {
  size: number;
  blocks: number;
  dataBlocks: number;
}


/** Copy every block of `source` into `writer`, then commit it; on failure nothing is left behind. */
export async function copyDisk(source: BlockSource, writer: DiskWriter): Promise<CopyStats> {
  let dataBlocks = 0;
  try {
    await forEachOrdered(
      source.blockCount,
      BLOCK_READ_AHEAD,
      (block) => source.readBlock(block),
      async (block, data) => {
        if (data === null) return;
        dataBlocks++;
        await writer.writeBlock(block, data);
        releaseBuffer(data); // writers are done with the bytes once writeBlock resolves
      },
    );
    await writer.finish();
  } catch (err) {
    await writer.abort();
    throw err;
  }
  return { size: source.size, blocks: source.blockCount, dataBlocks };
}

export interface ConvertOptions {
  format: OutputFormat;
  fromRaw?: boolean;
  /** Codec of a directory output's files. */
  compression?: Compression;
}

/** Convert a VHD (any type, through its chain) or raw image into a full disk of `format`. */
export async function convert(input: string, output: string, options: ConvertOptions): Promise<CopyStats> {
  const source = await openSource(input, { fromRaw: options.fromRaw });
  try {
    const writer = await createDiskWriter(output, options.format, source.size, source.blockSize, options.compression);
    return await copyDisk(source, writer);
  } finally {
    await source.close();
  }
}
