import { createHash } from 'node:crypto';
import { type FileHandle, open } from 'node:fs/promises';
import { describeFsError, VaultError } from '../util/errors.js';
import { AtomicFile } from '../util/fsync.js';

/** SHA-256 of a block's content, 32 bytes. */
export const DIGEST_SIZE = 32;
export const DIGEST_ALGORITHM = 'sha256';

export function digestOf(data: Buffer | Uint8Array): Buffer {
  return createHash(DIGEST_ALGORITHM).update(data).digest();
}

const zeroDigests = new Map<number, Buffer>();

/** Digest of an all-zero block (cached per block size). */
export function zeroDigest(blockSize: number): Buffer {
  let d = zeroDigests.get(blockSize);
  if (!d) {
    d = digestOf(Buffer.alloc(blockSize));
    zeroDigests.set(blockSize, d);
  }
  return d;
}

/** Records flushed per write while a digests file is produced. */
const BATCH = 4096;

/**
 * Writes a digests file: one 32-byte digest per block of the disk, in block
 * order, of the block's content at that backup. Written under a temporary name.
 */
export class DigestWriter {
  private readonly buf = Buffer.alloc(BATCH * DIGEST_SIZE);
  private filled = 0;
  private written = 0;

  private constructor(private readonly file: AtomicFile) {}

  static async create(path: string): Promise<DigestWriter> {
    return new DigestWriter(await AtomicFile.create(path));
  }

  async append(digest: Buffer): Promise<void> {
    digest.copy(this.buf, this.filled * DIGEST_SIZE);
    if (++this.filled === BATCH) await this.flush();
  }

  private async flush(): Promise<void> {
    if (this.filled === 0) return;
    await this.file.handle.write(this.buf, 0, this.filled * DIGEST_SIZE, this.written * DIGEST_SIZE);
    this.written += this.filled;
    this.filled = 0;
  }

  async finish(): Promise<void> {
    await this.file.commit(() => this.flush());
  }

  abort(): Promise<void> {
    return this.file.abort();
  }
}

/** Random access to a digests file, read in chunks so sequential use costs few reads. */
export class DigestReader {
  private chunkStart = -1;
  private chunk = Buffer.alloc(0);

  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    readonly count: number,
  ) {}

  static async open(path: string, expectedCount: number): Promise<DigestReader> {
    const fh = await open(path, 'r').catch((err: unknown) => {
      throw new VaultError(path, (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'digests file is missing' : `cannot open digests: ${describeFsError(err)}`);
    });
    const { size } = await fh.stat();
    if (size !== expectedCount * DIGEST_SIZE) {
      await fh.close();
      throw new VaultError(path, `digests file has ${size} bytes, expected ${expectedCount * DIGEST_SIZE} (${expectedCount} blocks)`);
    }
    return new DigestReader(path, fh, expectedCount);
  }

  async get(block: number): Promise<Buffer> {
    if (block < 0 || block >= this.count) throw new RangeError(`block ${block} outside ${this.count} digests`);
    const start = Math.floor(block / BATCH) * BATCH;
    if (start !== this.chunkStart) {
      // Read into a fresh buffer and swap it in whole: concurrent callers never see a half-filled chunk.
      const n = Math.min(BATCH, this.count - start);
      const chunk = Buffer.alloc(n * DIGEST_SIZE);
      const { bytesRead } = await this.fh.read(chunk, 0, chunk.length, start * DIGEST_SIZE);
      if (bytesRead !== chunk.length) throw new VaultError(this.path, 'digests file is truncated');
      this.chunk = chunk;
      this.chunkStart = start;
    }
    const at = (block - this.chunkStart) * DIGEST_SIZE;
    if (this.chunkStart !== start) return this.get(block); // another caller swapped chunks meanwhile
    return Buffer.from(this.chunk.subarray(at, at + DIGEST_SIZE));
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}
