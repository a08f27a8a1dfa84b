import { createHash, createHmac, webcrypto } from 'node:crypto';
import { isNotFound, type Storage } from '../storage/Storage.js';
import { VaultError } from '../util/errors.js';
import type { BackupMetadata, DigestAlgorithm } from './metadata.js';

/** A block's digest is 32 bytes: its SHA-256, or in an encrypted repository its HMAC-SHA256 under the MAC key. */
export const DIGEST_SIZE = 32;

/** How a repository digests blocks (the worker threads rebuild it from `key`). */
export interface Digester {
  readonly algorithm: DigestAlgorithm;
  /** The MAC key of an encrypted repository, else null. */
  readonly key: Uint8Array | null;
  of(data: Uint8Array): Buffer;
  /**
   * The same digest, computed on libuv's thread pool (WebCrypto runs there, on a
   * copy of `data`): a restore digests every block, and on the main thread that
   * was its largest cost, in series with everything else it does.
   */
  ofOffThread(data: Uint8Array): Promise<Buffer>;
  /** The digest of an all-zero block (cached per block size). */
  zero(blockSize: number): Buffer;
}

/**
 * SHA-256 in a plain repository. In an encrypted one a plain digest would let
 * anyone holding a candidate block confirm that a disk contains it (the
 * objects layout names block objects by digest), so the digest is keyed.
 */
export function digesterFor(key: Uint8Array | null): Digester {
  const of = key === null ? (data: Uint8Array) => createHash('sha256').update(data).digest() : (data: Uint8Array) => createHmac('sha256', key).update(data).digest();
  const zeros = new Map<number, Buffer>();
  let macKey: Promise<webcrypto.CryptoKey> | null = null;
  const ofOffThread = async (data: Uint8Array): Promise<Buffer> => {
    if (key === null) return Buffer.from(await webcrypto.subtle.digest('SHA-256', data));
    macKey ??= webcrypto.subtle.importKey('raw', key, { name: 'HMAC', hash: 'SHA-256' }, false, ['sign']);
    return Buffer.from(await webcrypto.subtle.sign('HMAC', await macKey, data));
  };
  return {
    algorithm: key === null ? 'sha256' : 'hmac-sha256',
    key,
    of,
    ofOffThread,
    zero(blockSize) {
      let d = zeros.get(blockSize);
      if (!d) zeros.set(blockSize, (d = of(Buffer.alloc(blockSize))));
      return d;
    },
  };
}

/** A plain repository's digester. */
export const SHA256_DIGESTER = digesterFor(null);

/**
 * A new backup's digests, one 32-byte digest per block of the disk in block
 * order, gathered in memory (32 bytes per 2 MiB block: 16 MiB for a 1 TiB
 * disk) and stored whole by the layout when the backup is complete.
 */
export class DigestList {
  private readonly buf: Buffer;
  private count = 0;

  constructor(blockCount: number) {
    this.buf = Buffer.alloc(blockCount * DIGEST_SIZE);
  }

  append(digest: Buffer): void {
    digest.copy(this.buf, this.count++ * DIGEST_SIZE);
  }

  get bytes(): Buffer {
    return this.buf;
  }
}

/** Digests read per request while a digests object is read in order. */
const CHUNK = 4096;

/** Random access to a stored digests object, read a chunk at a time so sequential use costs few requests. */
export class DigestReader {
  private chunkStart = -1;
  private chunk: Buffer = Buffer.alloc(0);

  private constructor(
    private readonly storage: Storage,
    private readonly key: string,
    readonly count: number,
    /** Digests per read: all of them when a ranged read costs a whole read (sealed objects). */
    private readonly perRead: number,
  ) {}

  static async open(storage: Storage, key: string, expectedCount: number): Promise<DigestReader> {
    const info = await storage.head(key);
    if (!info || info.prefix) throw new VaultError(storage.describe(key), 'digests file is missing');
    if (info.size !== expectedCount * DIGEST_SIZE) {
      // A sealed object's size is only inferred (stored size less the envelope's): open it, so that
      // damage (a truncation) is reported as what it is, not as a size the file does not have.
      if (!storage.capabilities.rangedReads) {
        await storage.get(key).catch((err: unknown) => {
          throw isNotFound(err) ? new VaultError(storage.describe(key), 'digests file is missing') : err;
        });
      }
      throw new VaultError(storage.describe(key), `digests file has ${info.size} bytes, expected ${expectedCount * DIGEST_SIZE} (${expectedCount} blocks)`);
    }
    return new DigestReader(storage, key, expectedCount, storage.capabilities.rangedReads ? CHUNK : Math.max(1, expectedCount));
  }

  async get(block: number): Promise<Buffer> {
    if (block < 0 || block >= this.count) throw new RangeError(`block ${block} outside ${this.count} digests`);
    const start = Math.floor(block / this.perRead) * this.perRead;
    if (start !== this.chunkStart) {
      // Read into a fresh buffer and swap it in whole: concurrent callers never see a half-filled chunk.
      const length = Math.min(this.perRead, this.count - start) * DIGEST_SIZE;
      const chunk = await this.storage.get(this.key, { offset: start * DIGEST_SIZE, length }).catch((err: unknown) => {
        throw isNotFound(err) ? new VaultError(this.storage.describe(this.key), 'digests file is missing') : err;
      });
      if (chunk.length !== length) throw new VaultError(this.storage.describe(this.key), 'digests file is truncated');
      this.chunk = chunk;
      this.chunkStart = start;
    }
    if (this.chunkStart !== start) return this.get(block); // another caller swapped chunks meanwhile
    const at = (block - this.chunkStart) * DIGEST_SIZE;
    return Buffer.from(this.chunk.subarray(at, at + DIGEST_SIZE));
  }

  async close(): Promise<void> {}
}

/** The SHA-256 (hex) that binds a digests object to its backup (BackupMetadata.digestsSha256). */
export function digestsSha256(bytes: Buffer): string {
  return createHash('sha256').update(bytes).digest('hex');
}

/**
 * Refuse a digests object (or block map) that is not the one its backup
 * recorded: another backup's map put in its place, or damage of the right size.
 */
export function checkDigestsBinding(bytes: Buffer, meta: BackupMetadata, where: string): void {
  if (meta.digestsSha256 !== undefined && digestsSha256(bytes) !== meta.digestsSha256) {
    throw new VaultError(where, `is not the digests of backup ${meta.id}: its SHA-256 differs from the one the backup's metadata records (replaced or damaged)`);
  }
}
