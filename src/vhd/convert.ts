import { FOOTER_SIZE } from './constants.js';
import { newFooter, serializeFooter } from './footer.js';
import { type ByteSink, checkFormatFits, openSink, type OutputTarget, outputTarget, type ProtectedPath, refuseProtected, writeImage } from './outputTarget.js';
import { openSource, type BlockSource } from './source.js';
import { blocksWithData, synthesizeDynamic, synthesizeVhd } from './synthesize.js';
import { VhdChain } from './VhdChain.js';
import { DynamicVhdWriter } from './VhdWriter.js';
import type { Compression } from './compression.js';
import { VhdDirectoryWriter } from './VhdDirectory.js';
import { AtomicFile, cleanUpAfter } from '../util/fsync.js';
import { BLOCK_READ_AHEAD, forEachOrdered } from '../util/pipeline.js';
import { dataRuns, isAllZero } from '../util/zero.js';
import { releaseBuffer } from '../util/bufferPool.js';
import type { OnProgress } from '../util/progress.js';

export type OutputFormat = 'vhd' | 'fixed' | 'raw' | 'dir';

/**
 * Receives a disk's blocks in order (null: all zeros); at a file target
 * nothing is visible until finish().
 */
export interface DiskWriter {
  writeBlock(block: number, data: Buffer | null): Promise<void>;
  finish(): Promise<void>;
  abort(): Promise<void>;
}

/** Dynamic VHD output, as a file or a directory: all-zero blocks stay unallocated. */
class DynamicDiskWriter implements DiskWriter {
  constructor(private readonly vhd: DynamicVhdWriter | VhdDirectoryWriter) {}
  async writeBlock(block: number, data: Buffer | null): Promise<void> {
    if (data !== null && !isAllZero(data)) await this.vhd.writeBlock(block, data);
  }
  finish(): Promise<void> {
    return this.vhd.finish();
  }
  abort(): Promise<void> {
    return this.vhd.abort();
  }
}

/**
 * The smallest run of zeros a file output leaves as a hole: 64 KiB keeps a
 * block to at most 32 writes, and is a whole number of filesystem blocks.
 */
const HOLE_GRANULE = 64 * 1024;

/**
 * Raw output (exactly `size` bytes) or a fixed VHD (raw plus a footer).
 * Zeros (whole blocks, and runs of HOLE_GRANULE inside one) are never written,
 * so they stay holes in the sparse file.
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
      throw await cleanUpAfter(err, () => file.abort());
    }
    return new FlatDiskWriter(file, size, blockSize, footer);
  }

  async writeBlock(block: number, data: Buffer | null): Promise<void> {
    if (data === null) return;
    const offset = block * this.blockSize;
    const length = Math.min(this.blockSize, this.size - offset);
    // Zeros inside a block are skipped too: a backup's block often holds a few
    // writes amid zeros, which would otherwise be written and flushed.
    for (const [start, end] of dataRuns(data.subarray(0, length), HOLE_GRANULE)) {
      await this.file.handle.write(data, start, end - start, offset + start);
      this.file.wrote(end - start);
    }
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

/**
 * Raw output (or a fixed VHD: raw plus a footer) to a device or a stream, in
 * order. Zero blocks are written too: a device is not sparse (its old content
 * would show through) and a stream has no holes.
 */
class SinkDiskWriter implements DiskWriter {
  private readonly zeros: Buffer;

  private constructor(
    private readonly sink: ByteSink,
    private readonly size: number,
    private readonly blockSize: number,
    private readonly footer: Buffer | null,
  ) {
    this.zeros = Buffer.alloc(blockSize);
  }

  static async create(target: OutputTarget, size: number, blockSize: number, fixedVhd: boolean): Promise<SinkDiskWriter> {
    const footer = fixedVhd ? serializeFooter(newFooter('fixed', size)) : null;
    return new SinkDiskWriter(await openSink(target, size + (footer ? FOOTER_SIZE : 0)), size, blockSize, footer);
  }

  async writeBlock(block: number, data: Buffer | null): Promise<void> {
    const offset = block * this.blockSize;
    const length = Math.min(this.blockSize, this.size - offset);
    await this.sink.write((data ?? this.zeros).subarray(0, length), offset);
  }

  async finish(): Promise<void> {
    if (this.footer) await this.sink.write(this.footer, this.size);
    await this.sink.finish();
  }

  abort(): Promise<void> {
    return this.sink.abort();
  }
}

/** A writer of `format` at `target`; a dynamic VHD to a stream is not one (see convert: it is synthesized). */
export async function createDiskWriter(
  target: OutputTarget,
  format: OutputFormat,
  size: number,
  blockSize: number,
  compression: Compression = 'none',
): Promise<DiskWriter> {
  checkFormatFits(target, format);
  if (target.kind !== 'file') {
    if (format !== 'raw' && format !== 'fixed') throw new Error(`${format} output cannot be written in order`);
    return SinkDiskWriter.create(target, size, blockSize, format === 'fixed');
  }
  const path = target.path;
  if (format === 'vhd') return new DynamicDiskWriter(await DynamicVhdWriter.create(path, { size, blockSize }));
  if (format === 'dir') return new DynamicDiskWriter(await VhdDirectoryWriter.create(path, { size, blockSize, compression }));
  return FlatDiskWriter.create(path, size, blockSize, format === 'fixed');
}

export interface CopyStats {
  size: number;
  blocks: number;
  dataBlocks: number;
}


/** Copy every block of `source` into `writer`, then commit it; on failure nothing is left behind. */
export async function copyDisk(source: BlockSource, writer: DiskWriter, onProgress?: OnProgress): Promise<CopyStats> {
  let dataBlocks = 0;
  try {
    await forEachOrdered(
      source.blockCount,
      BLOCK_READ_AHEAD,
      (block) => source.readBlock(block),
      async (block, data) => {
        // Null blocks too: a device or stream writer writes their zeros.
        await writer.writeBlock(block, data);
        if (data !== null) {
          dataBlocks++;
          releaseBuffer(data); // writers are done with the bytes once writeBlock resolves
        }
        // A throw here (an interrupt) aborts the writer like any failure.
        onProgress?.(block + 1, source.blockCount, Math.min(source.size, (block + 1) * source.blockSize));
      },
    );
    await writer.finish();
  } catch (err) {
    throw await cleanUpAfter(err, () => writer.abort());
  }
  return { size: source.size, blocks: source.blockCount, dataBlocks };
}

export interface ConvertOptions {
  format: OutputFormat;
  fromRaw?: boolean;
  /** Codec of a directory output's files. */
  compression?: Compression;
  onProgress?: OnProgress;
}

/** What a conversion must not write over: its input and every file of its chain, aliases included. */
function inputPaths(input: string, source: BlockSource): ProtectedPath[] {
  const paths: ProtectedPath[] = [{ path: input, what: 'the input' }];
  if (!(source instanceof VhdChain)) return paths;
  source.members.forEach((member, i) => {
    const alias = source.aliases[i];
    if (i === 0) {
      paths.push({ path: member.path, what: 'the input' });
      return;
    }
    paths.push({ path: member.path, what: `${member.path}, a parent of the input` });
    if (alias) paths.push({ path: alias, what: `${alias}, the alias of a parent of the input` });
  });
  return paths;
}

/** Blocks of `source` holding any non-zero byte (one full read). */
async function blocksHoldingData(source: BlockSource): Promise<number[]> {
  const present: number[] = [];
  await forEachOrdered(
    source.blockCount,
    BLOCK_READ_AHEAD,
    (block) => source.readBlock(block),
    async (block, data) => {
      if (data === null) return;
      if (!isAllZero(data)) present.push(block);
      releaseBuffer(data);
    },
  );
  return present;
}

/**
 * A dynamic VHD to a stream: its table comes before its blocks, so which
 * blocks it carries must be known first: a chain knows, a raw image is read
 * once to find out.
 */
async function streamDynamicVhd(source: BlockSource, target: OutputTarget, onProgress?: OnProgress): Promise<CopyStats> {
  const present = source instanceof VhdChain ? blocksWithData(source) : await blocksHoldingData(source);
  const image = source instanceof VhdChain ? synthesizeVhd(source) : synthesizeDynamic(source, present, (b) => source.readBlock(b));
  await writeImage(target, image, onProgress);
  return { size: source.size, blocks: source.blockCount, dataBlocks: present.length };
}

/**
 * Convert a VHD (any type, through its chain; or a Xen Orchestra alias to
 * one) or raw image into a full disk of `format` at `target`. Refused before
 * anything is written: a target that is the input or any file of its chain.
 */
export async function convert(input: string, output: OutputTarget | string, options: ConvertOptions): Promise<CopyStats> {
  const target = typeof output === 'string' ? await outputTarget(output) : output;
  const source = await openSource(input, { fromRaw: options.fromRaw, fromRawFlag: '--from raw' });
  try {
    await refuseProtected(target, inputPaths(input, source));
    checkFormatFits(target, options.format);
    if (target.kind !== 'file' && options.format === 'vhd') return await streamDynamicVhd(source, target, options.onProgress);
    const writer = await createDiskWriter(target, options.format, source.size, source.blockSize, options.compression);
    return await copyDisk(source, writer, options.onProgress);
  } finally {
    await source.close();
  }
}
