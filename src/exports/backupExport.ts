/**
 * A backup served over NBD without being materialized: reads go through the
 * chain, and every block is checked against the backup's digests the first
 * time it is read (as restore checks it). After that a block whose data one
 * member holds whole is read in place, a few KiB at a time, so random 4 KiB
 * reads do not cost a 2 MiB read and digest each; other blocks (compressed,
 * or composed from several members) are kept whole in a small cache.
 * A reader going through the disk in order has the next blocks read and
 * checked ahead of its requests, so that a first pass waits for neither.
 */
import { AllocationFlag, Errno } from '../nbd/constants.js';
import { ExportError } from '../nbd/errors.js';
import type { NbdExport, ReadPiece } from '../nbd/export.js';
import type { Extent } from '../nbd/transmission.js';
import type { VhdDisk } from '../vhd/disk.js';
import type { BlockSource } from '../vhd/source.js';
import { verifiedChain } from '../store/chain.js';
import { lineage } from '../store/lineage.js';
import type { BackupMetadata, Repository } from '../store/repository.js';

/**
 * Whole blocks kept after a read (2 MiB each), shared by every export a server
 * offers: enough for a few sequential readers, bounded however many exports are open.
 */
export class BlockCache {
  private readonly blocks = new Map<string, Buffer | null>();
  constructor(private readonly capacity = 16) {}

  get(key: string): Buffer | null | undefined {
    if (!this.blocks.has(key)) return undefined;
    const data = this.blocks.get(key)!;
    this.blocks.delete(key); // most recently used last
    this.blocks.set(key, data);
    return data;
  }

  has(key: string): boolean {
    return this.blocks.has(key);
  }

  set(key: string, data: Buffer | null): void {
    this.blocks.set(key, data);
    if (this.blocks.size > this.capacity) this.blocks.delete(this.blocks.keys().next().value!);
  }
}
/**
 * Blocks read and checked ahead of a reader that goes in order (4 MiB
 * beside the cache's 16 blocks): enough that the next block's read and
 * digest overlap the replies from this one.
 */
const READ_AHEAD = 2;

/** Blocks one allocation answer covers at most (the client asks again for the rest). */
const STATUS_BLOCKS = 65536;

/** One block's part of a byte range. */
export interface Segment {
  block: number;
  /** Offset inside the block. */
  inBlock: number;
  length: number;
  /** Offset in the disk. */
  offset: number;
}

export function* segments(offset: number, length: number, blockSize: number): Generator<Segment> {
  for (let done = 0; done < length; ) {
    const at = offset + done;
    const block = Math.floor(at / blockSize);
    const inBlock = at - block * blockSize;
    const n = Math.min(blockSize - inBlock, length - done);
    yield { block, inBlock, length: n, offset: at };
    done += n;
  }
}

/** Append a piece, joining it to the previous one when both are holes. */
export function pushPiece(pieces: ReadPiece[], piece: ReadPiece): void {
  const last = pieces.at(-1);
  if (last && 'hole' in last && 'hole' in piece) last.hole += piece.hole;
  else pieces.push(piece);
}

export class BackupExport implements NbdExport {
  readonly writable = false;
  /** 1 once a block's data matched its digest (or it is known zero). */
  private readonly verified: Uint8Array;
  /** Per block: the member holding it whole and readable in place, -1 none (read whole), -2 not yet known. */
  private readonly holder: Int32Array;
  private readonly pending = new Map<number, Promise<Buffer | null>>();
  /** Where the last read ended: a read that starts there continues an in-order pass. */
  private lastEnd = -1;

  private constructor(
    readonly meta: BackupMetadata,
    private readonly members: VhdDisk[],
    /** Per member: every differencing block it stores is whole (vhdvault's own backups). */
    private readonly wholeBlocks: boolean[],
    private readonly source: BlockSource,
    private readonly cache: BlockCache,
  ) {
    this.verified = new Uint8Array(source.blockCount);
    this.holder = new Int32Array(source.blockCount).fill(-2);
  }

  /** Open a backup's chain, checked as restore checks it; the caller holds read access to the disk. */
  static async open(repo: Repository, meta: BackupMetadata, cache = new BlockCache()): Promise<BackupExport> {
    const metas = await lineage(repo, meta);
    const { chain, source } = await verifiedChain(repo, meta);
    return new BackupExport(
      meta,
      chain.members,
      metas.map((m) => m.wholeBlocks === true),
      source,
      cache,
    );
  }

  get size(): number {
    return this.source.size;
  }

  get blockSize(): number {
    return this.source.blockSize;
  }

  /** Does any member store this block? */
  isAllocated(block: number): boolean {
    return this.members.some((m) => m.isAllocated(block));
  }

  /** The block as the backup holds it (null: zeros), checked against its digest; cached. */
  async block(block: number): Promise<Buffer | null> {
    const cached = this.cache.get(this.cacheKey(block));
    if (cached !== undefined) return cached;
    let read = this.pending.get(block);
    if (!read) {
      read = this.source.readBlock(block).catch((err: unknown) => {
        throw new ExportError(Errno.EIO, (err as Error).message);
      });
      this.pending.set(block, read);
    }
    try {
      const data = await read;
      this.verified[block] = 1;
      this.cache.set(this.cacheKey(block), data);
      return data;
    } finally {
      this.pending.delete(block);
    }
  }

  private cacheKey(block: number): string {
    return `${this.meta.id}:${block}`;
  }

  /** The member to read a verified block from in place, or -1. */
  private inPlace(block: number): number {
    let h = this.holder[block]!;
    if (h === -2) {
      h = this.members.findIndex((m) => m.isAllocated(block));
      const m = this.members[h];
      const whole = m !== undefined && (m.footer.diskType !== 'differencing' || this.wholeBlocks[h]!);
      if (!whole || !m.rangeReads || !m.readBlockRange) h = -1;
      this.holder[block] = h;
    }
    return h;
  }

  /**
   * Start reading (and checking) the blocks after `block` that are stored and
   * not yet checked. Errors are left to the read that needs the block.
   */
  private readAhead(block: number): void {
    const last = Math.min(block + READ_AHEAD, this.source.blockCount - 1);
    for (let b = block + 1; b <= last; b++) {
      if (this.verified[b] || this.pending.has(b) || !this.isAllocated(b)) continue;
      this.block(b).catch(() => {});
    }
  }

  async read(offset: number, length: number): Promise<ReadPiece[]> {
    if (offset === this.lastEnd) this.readAhead(Math.floor((offset + length - 1) / this.blockSize));
    this.lastEnd = offset + length;
    const pieces: ReadPiece[] = [];
    for (const s of segments(offset, length, this.blockSize)) {
      if (!this.isAllocated(s.block)) {
        // Known zero: the chain's digests were checked to say so when it was opened.
        pushPiece(pieces, { offset: s.offset, hole: s.length });
        continue;
      }
      const member = this.verified[s.block] && !this.cache.has(this.cacheKey(s.block)) ? this.inPlace(s.block) : -1;
      let data: Buffer;
      if (member >= 0) {
        data = await this.members[member]!.readBlockRange!(s.block, s.inBlock, s.length).catch((err: unknown) => {
          throw new ExportError(Errno.EIO, (err as Error).message);
        });
      } else {
        const whole = await this.block(s.block);
        if (whole === null) {
          pushPiece(pieces, { offset: s.offset, hole: s.length });
          continue;
        }
        data = whole.subarray(s.inBlock, s.inBlock + s.length);
      }
      pieces.push({ offset: s.offset, data });
    }
    return pieces;
  }

  async allocation(offset: number, length: number): Promise<Extent[]> {
    const extents: Extent[] = [];
    let n = 0;
    for (const s of segments(offset, length, this.blockSize)) {
      if (++n > STATUS_BLOCKS) break;
      const flags = this.isAllocated(s.block) ? 0 : AllocationFlag.HOLE | AllocationFlag.ZERO;
      const last = extents.at(-1);
      if (last && last.flags === flags && last.length + s.length <= 0xffffffff) last.length += s.length;
      else extents.push({ length: s.length, flags });
    }
    return extents;
  }

  async close(): Promise<void> {
    await this.source.close();
  }
}
