import { Readable } from 'node:stream';
import { Bat, batByteSize } from './bat.js';
import { bitmapByteSize, fullBitmap } from './bitmap.js';
import { BAT_OFFSET, FOOTER_SIZE, SECTOR_SIZE } from './constants.js';
import { type Footer, newFooter, serializeFooter } from './footer.js';
import { newHeader, serializeHeader } from './header.js';
import type { VhdChain } from './VhdChain.js';
import { BLOCK_READ_AHEAD, orderedReadAhead, range } from '../util/pipeline.js';

/** A disk image produced on the fly, whose exact length is known before its first byte. */
export interface SynthesizedImage {
  length: number;
  stream: Readable;
}


/** Blocks that some member of the chain stores: the only ones a synthesized VHD carries. */
export function blocksWithData(chain: VhdChain): number[] {
  const blocks: number[] = [];
  for (let b = 0; b < chain.blockCount; b++) {
    if (chain.members.some((m) => m.isAllocated(b))) blocks.push(b);
  }
  return blocks;
}

/** Reads one block of the chain's content (the chain's own reader, or one that also verifies). */
export type BlockReader = (block: number) => Promise<Buffer | null>;

/**
 * A full dynamic VHD of the chain's current content, streamed: footer copy,
 * header, BAT, then every block some member stores (bitmap all ones, data read
 * through the chain), then the footer. It keeps the top disk's UUID and
 * timestamp, so the same chain always yields the same bytes. `read` supplies
 * block content (default: the chain's). The caller closes the chain after the
 * stream ends.
 */
export function synthesizeVhd(chain: VhdChain, read: BlockReader = (b) => chain.readBlock(b)): SynthesizedImage {
  const top = chain.top.footer;
  return synthesizeDynamic(chain, blocksWithData(chain), read, { uuid: top.uuid, timestamp: top.timestamp });
}

/** The shape of a disk to synthesize. */
export interface DiskShape {
  size: number;
  blockSize: number;
  blockCount: number;
}

/**
 * A full dynamic VHD carrying the `present` blocks (ascending), streamed. With
 * no `identity`, the disk gets a new UUID and the current time.
 */
export function synthesizeDynamic(
  disk: DiskShape,
  present: number[],
  read: BlockReader,
  identity?: { uuid: string; timestamp: number },
): SynthesizedImage {
  const { size, blockSize, blockCount } = disk;
  const storedBlock = bitmapByteSize(blockSize) + blockSize;
  const firstBlock = BAT_OFFSET + batByteSize(blockCount);
  const bat = Bat.empty(blockCount);
  present.forEach((block, i) => bat.set(block, (firstBlock + i * storedBlock) / SECTOR_SIZE));

  const fresh = newFooter('dynamic', size, identity?.uuid);
  const footer: Footer = { ...fresh, timestamp: identity?.timestamp ?? fresh.timestamp };
  const footerBytes = serializeFooter(footer);
  const header = serializeHeader(newHeader(blockCount, blockSize));
  const bitmap = fullBitmap(blockSize);
  const zeros = Buffer.alloc(blockSize);

  async function* bytes(): AsyncGenerator<Buffer> {
    yield footerBytes;
    yield header;
    yield bat.toBuffer();
    for await (const [, data] of orderedReadAhead(present, BLOCK_READ_AHEAD, read)) {
      yield bitmap;
      yield data ?? zeros;
    }
    yield footerBytes;
  }
  return { length: firstBlock + present.length * storedBlock + FOOTER_SIZE, stream: Readable.from(bytes(), { objectMode: false }) };
}

/** The chain's content as a raw image of exactly its virtual size, streamed. */
export function synthesizeRaw(chain: VhdChain, read: BlockReader = (b) => chain.readBlock(b)): SynthesizedImage {
  const { size, blockSize, blockCount } = chain;
  const zeros = Buffer.alloc(blockSize);
  async function* bytes(): AsyncGenerator<Buffer> {
    for await (const [block, data] of orderedReadAhead(range(blockCount), BLOCK_READ_AHEAD, read)) {
      const length = Math.min(blockSize, size - block * blockSize);
      yield (data ?? zeros).subarray(0, length);
    }
  }
  return { length: size, stream: Readable.from(bytes(), { objectMode: false }) };
}
