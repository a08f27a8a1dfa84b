import { setMaxListeners } from 'node:events';
import pLimit from 'p-limit';
import { setBit, testBit } from '../vhd/bitmap.js';
import type { BlockSource } from '../vhd/source.js';
import { releaseBuffer } from '../util/bufferPool.js';
import { BLOCK_READ_AHEAD, orderedReadAhead, range } from '../util/pipeline.js';
import type { BlockTarget } from './blockTask.js';
import { type Digester, DigestList } from './digests.js';
import type { BackupWriter, Digests } from './layouts/Layout.js';
import { BlockPool } from './pool.js';
import { BusyClock, figures, type Stage, type StageFigures } from './stages.js';
import type { Limiter } from './throttle.js';

/** Source reads in flight at once: enough to keep storage busy, few enough not to thrash a disk. */
const SOURCE_READS_IN_FLIGHT = 4;

/** What the pipeline runs over: a source, the new backup's writer, and the previous backup's digests. */
export interface PipelineInput {
  source: BlockSource;
  writer: BackupWriter;
  previous: Digests | null;
  /** The repository's: workers digest blocks with it. */
  digester: Digester;
  /** Blocks a changed-block bitmap or dirty bitmap marks (one bit per block); null: every block is read. */
  changed: Buffer | null;
  concurrency: number;
  readLimit: Limiter;
  writeLimit: Limiter;
  /** Writes wait for writeLimit: a worker prepares the bytes and the main thread paces them. */
  paced: boolean;
  onProgress?: (doneBlocks: number, totalBlocks: number, bytesRead: number) => void;
  /** Aborted: blocks waiting for their turn under a rate limit give up at once. */
  signal: AbortSignal;
  /** Worker threads shared with other pipelines (a VM backup's disks), left open; default: a pool of `concurrency` threads of its own. */
  pool?: BlockPool;
  /**
   * Told each block once the source is no longer needed for it: first, at the
   * start, every block a delta will not read (unchanged since the previous
   * backup); then the others in order, once the new backup's staging holds
   * their data or they were found unchanged or zero. (A live backup discards
   * each from the frozen view then.)
   */
  onSettled?: (block: number) => void;
}

export interface PipelineResult {
  digests: DigestList;
  blocksRead: number;
  blocksWritten: number;
  bytesWritten: number;
  /** Bytes of data the source gave for the blocks read (holes excepted). */
  fileBytesRead: number;
  stages: Record<Stage, StageFigures>;
}

/** A block as the in-order consumer needs it. */
interface Produced {
  digest: Buffer;
  store: boolean;
  /** Kept for the main thread (a writer that stores blocks in order). */
  data: Buffer | null;
  storedBytes: number;
}

/**
 * Blocks are read in order (ahead of the workers), digested, compared with the
 * previous backup's digests, and only changed ones stored, as the layout's
 * writer directs; the digests of every block are gathered in order. A failed
 * run returns only once no block task runs any more (read, worker or write):
 * the writer's abort then finds every file it has to remove.
 */
export class BackupPipeline {
  private readonly clocks = { read: new BusyClock(), write: new BusyClock() };
  private readonly workerMs = { digest: 0, compress: 0, write: 0 };
  private readonly readSlots = pLimit(SOURCE_READS_IN_FLIGHT);
  private readonly zero: Buffer;
  private blocksRead = 0;
  private fileBytesRead = 0;
  /** The first block failure: those still in flight do no more work, are only waited for, and fail with it (the error reported is the cause, whichever block the in-order consumer meets first). */
  private failure: { error: unknown } | null = null;

  private constructor(
    private readonly input: PipelineInput,
    private readonly pool: BlockPool,
  ) {
    this.zero = input.digester.zero(input.source.blockSize);
    setMaxListeners(0, input.signal); // one per block waiting its turn: up to the read-ahead, by design
  }

  static async run(input: PipelineInput): Promise<PipelineResult> {
    const pipeline = new BackupPipeline(input, input.pool ?? (await BlockPool.create(input.concurrency)));
    try {
      return await pipeline.consume();
    } finally {
      if (!input.pool) await pipeline.pool.close();
    }
  }

  /** A failure stops every block still in flight at its next step. */
  private readonly stop = (err: unknown): never => {
    this.failure ??= { error: err };
    throw this.failure.error;
  };

  /** Between the steps of a block: give up once the backup failed or was stopped. */
  private going(): void {
    if (this.failure) throw this.failure.error;
    if (this.input.signal.aborted) throw new Error('the backup stopped');
  }

  /** Read, digest and hand one block to its worker; resolves to what the in-order consumer needs. */
  private async produce(block: number): Promise<Produced> {
    const { source, previous, changed, writer, readLimit, writeLimit, signal } = this.input;
    const { blockSize, size } = source;
    const prev = previous ? await previous.get(block) : null;
    if (changed && prev && !testBit(changed, block)) return { digest: prev, store: false, data: null, storedBytes: 0 };
    let data = await this.readSlots(async () => {
      this.going();
      await readLimit.take(blockSize, signal);
      return this.clocks.read.time(() => source.readBlock(block));
    });
    this.blocksRead++;
    this.clocks.read.bytes += blockSize;
    if (data !== null) this.fileBytesRead += Math.min(blockSize, size - block * blockSize); // (an NbdSource counts its own)
    if (data === null) {
      // Known zero (unallocated in a VHD source): stored only to hide older data.
      if (prev === null || prev.equals(this.zero)) return { digest: this.zero, store: false, data: null, storedBytes: 0 };
      data = Buffer.alloc(blockSize);
    }
    this.going();
    const output = await writer.output(block, this.input.paced);
    const task = { block, data: data.buffer as ArrayBuffer, byteOffset: data.byteOffset, length: data.length, previousDigest: prev, digestKey: this.input.digester.key, compression: writer.codec, bare: writer.bare, output };
    const result = await this.pool.run(task);
    this.workerMs.digest += result.digestMs;
    this.workerMs.compress += result.compressMs;
    this.workerMs.write += result.writeMs;
    const digest = Buffer.from(result.digest);
    let target: BlockTarget | null = null;
    if (result.store && result.prepared) {
      target = writer.place(block, digest);
      // Not needed after all (a block object already in the store, say): named, not sent again.
      if (target === null) result.store = false;
    }
    if (result.store) await writeLimit.take(result.storedBytes, signal);
    if (result.store) this.going();
    if (result.store && result.prepared && target) this.workerMs.write += await this.pool.write({ target, parts: result.prepared });
    const keep = result.store && writer.writesInOrder; // the main thread still has to store it
    if (!keep) releaseBuffer(result.data);
    return { digest, store: result.store, data: keep ? Buffer.from(result.data.buffer, result.data.byteOffset, result.data.length) : null, storedBytes: result.storedBytes };
  }

  /** A delta's blocks that are never read (see produce), told settled before any block is read; the set of them. */
  private async settleUnread(): Promise<Buffer | null> {
    const { changed, previous, onSettled, source } = this.input;
    if (!changed || !previous || !onSettled) return null;
    const unread = Buffer.alloc(Math.ceil(source.blockCount / 8));
    for (let block = 0; block < source.blockCount; block++) {
      if (testBit(changed, block) || (await previous.get(block)) === null) continue;
      setBit(unread, block);
      onSettled(block);
    }
    return unread;
  }

  /** Blocks in order: their digests, and each stored block handed to the writer. */
  private async consume(): Promise<PipelineResult> {
    const { source, writer, concurrency, onProgress } = this.input;
    const unread = await this.settleUnread();
    const digests = new DigestList(source.blockCount);
    let [done, blocksWritten, bytesWritten, bytesCompressed] = [0, 0, 0, 0];
    // Two blocks per worker keep them all busy; at most 64 blocks (128 MiB) in flight whatever --concurrency.
    const readAhead = Math.min(64, Math.max(BLOCK_READ_AHEAD, concurrency * 2));
    for await (const [block, r] of orderedReadAhead(range(source.blockCount), readAhead, (b) => this.produce(b).catch(this.stop))) {
      digests.append(r.digest);
      if (r.store) {
        blocksWritten++;
        bytesWritten += r.storedBytes;
        if (writer.writesInOrder) {
          await this.clocks.write.time(() => writer.record(block, r.data)).catch(this.stop);
          releaseBuffer(r.data!);
        } else {
          await writer.record(block, null).catch(this.stop);
          bytesCompressed += source.blockSize;
        }
      }
      if (!unread || !testBit(unread, block)) this.input.onSettled?.(block);
      onProgress?.(++done, source.blockCount, this.clocks.read.bytes);
    }
    const threads = concurrency;
    const stages: Record<Stage, StageFigures> = {
      read: figures(this.clocks.read.bytes, this.clocks.read.busyMs),
      digest: figures(this.blocksRead * source.blockSize, this.workerMs.digest / threads),
      compress: figures(writer.codec === 'none' ? 0 : bytesCompressed, this.workerMs.compress / threads),
      write: figures(bytesWritten, writer.writesInOrder ? this.clocks.write.busyMs : this.workerMs.write / threads),
    };
    return { digests, blocksRead: this.blocksRead, blocksWritten, bytesWritten, fileBytesRead: this.fileBytesRead, stages };
  }
}
