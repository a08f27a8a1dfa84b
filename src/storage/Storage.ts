import { VaultError } from '../util/errors.js';

/**
 * The repository's storage, shaped like an object store (docs/design/04-repository.md §4.13):
 * keys are `/`-separated names relative to the repository (`disks/vm/<id>.json`),
 * never paths. Everything above this seam (temporary names, metadata last,
 * chains resolved by metadata, locks) is written once, in src/store, against it.
 */

/** Where a repository lives, in a form a worker thread can receive and reopen (see openStorage). */
export type StorageDescriptor = LocalDescriptor | S3Descriptor;

export type LocalDescriptor = { kind: 'local'; root: string };

/** An S3-compatible bucket; endpoint and region, when absent, come from the environment (AWS_ENDPOINT_URL, AWS_REGION). */
export type S3Descriptor = { kind: 's3'; bucket: string; prefix: string; endpoint?: string; region?: string };

/** What a backend can do beyond the common operations; declared, never guessed. */
export interface StorageCapabilities {
  /** rename(): atomic rename of an object or of a whole prefix. A local folder has it; an object store does not. */
  rename: boolean;
  /** localPath(): objects are files that format code may open, seek in and write in place (the `vhd` layout needs it). */
  localFiles: boolean;
  /** get() of a range reads only those bytes. Not so for sealed objects (an encrypted repository's): each is opened whole, so read it once. */
  rangedReads: boolean;
}

export interface ObjectInfo {
  size: number;
  mtimeMs: number;
  /** The key names a prefix (a folder) rather than one object. */
  prefix: boolean;
}

/** One object found by listAll(). */
export interface ListedObject {
  /** Relative to the repository, `/`-separated. */
  key: string;
  size: number;
  mtimeMs: number;
}

/** What put() stores: bytes, text, or pieces of bytes taken in order. */
export type PutData = Buffer | string | readonly Uint8Array[];

/** Pieces joined (for a backend that needs one body). */
export function joined(data: PutData): Buffer | string {
  return typeof data === 'string' || Buffer.isBuffer(data) ? data : Buffer.concat(data);
}

export type BatchOp = { put: string; data: Buffer | string } | { delete: string } | { rename: string; to: string };

export interface Storage {
  readonly descriptor: StorageDescriptor;
  readonly capabilities: StorageCapabilities;
  /** A key as the user should see it in a message (a path, or a URI). */
  describe(key: string): string;
  /** An object's bytes (a range of them); NotFoundError when absent. */
  get(key: string, range?: { offset: number; length: number }): Promise<Buffer>;
  /** What is at `key`, or null. */
  head(key: string): Promise<ObjectInfo | null>;
  /** The names one level below `prefix` ('' for the top), sorted; [] when there is nothing. */
  list(prefix: string): Promise<string[]>;
  /**
   * Store an object whole and durably: readers see the old object or the new
   * one, never part. With `ifAbsent`, only if nothing is at `key` (false then).
   * Pieces are the object's bytes in order (a block and its envelope, written without joining them).
   */
  put(key: string, data: PutData, options?: { ifAbsent?: boolean }): Promise<boolean>;
  /**
   * Create a new object fast, not yet durable: for the many block files of a
   * backup under its staged (temporary) prefix, made durable at once by sync().
   */
  create(key: string, parts: Uint8Array[]): Promise<void>;
  /** Make everything created under `prefix` durable. */
  sync(prefix: string): Promise<void>;
  /**
   * Remove an object, or a prefix and all below it; nothing there is not an error. Durable when it resolves,
   * unless `durable` is false: for what is already provably garbage, which a crash may bring back for the
   * next cleanup to remove again (a backend whose deletions are always durable ignores it).
   */
  delete(key: string, options?: DeleteOptions): Promise<void>;
  /** Remove many objects (not prefixes), concurrently; missing ones are fine. Durable when it resolves. */
  deleteMany(keys: string[]): Promise<void>;
  /** Every object below `prefix` ('' for all), at any depth, in no particular order; streamed a page at a time. */
  listAll(prefix: string): AsyncIterable<ListedObject>;
  /**
   * Apply operations in order; durable when it resolves. A crash leaves some
   * first part of them done: put the one that commits last.
   */
  batch(ops: BatchOp[]): Promise<void>;
  /** Capability `rename`: move an object or prefix to a key where nothing is; durable when it resolves. */
  rename?(from: string, to: string): Promise<void>;
  /**
   * Capability `rename`: move many objects, in any order and concurrently;
   * durable when it resolves (a crash leaves any subset moved), unless `durable`
   * is false: moves whose loss in a crash harms nothing (moving garbage aside).
   * A pair whose source is gone is skipped when `ignoreMissing` (a resumed merge).
   */
  moveAll?(pairs: Array<[from: string, to: string]>, options?: { ignoreMissing?: boolean; durable?: boolean }): Promise<void>;
  /** Capability `localFiles`: the file behind a key, for the VHD format code. */
  localPath?(key: string): string;
}

/** How a deletion is made: `durable: false` spares the folder fsyncs (see Storage.delete). */
export interface DeleteOptions {
  durable?: boolean;
}

/** A storage operation failed; `code` keeps the backend's reason (an errno such as ENOSPC or EROFS). */
export class StorageError extends VaultError {
  constructor(
    file: string,
    problem: string,
    readonly code?: string,
  ) {
    super(file, problem);
  }
}

/** Nothing is stored at the key. */
export class NotFoundError extends StorageError {}

export function isNotFound(err: unknown): boolean {
  return err instanceof NotFoundError;
}

/** The store did not answer (timeouts, lost connections, 5xx after every retry): nothing is known of the object. */
export function isUnavailable(err: unknown): boolean {
  const code = err instanceof StorageError ? (err.code ?? '') : '';
  return /^(S3_5\d\d|ETIMEDOUT|ECONNRESET|EPIPE|ECONNREFUSED|EAI_AGAIN|ENOTFOUND|EHOSTUNREACH|ENETUNREACH|EIO)$/.test(code);
}

/** Join key parts with '/', refusing parts that would climb out of the repository. */
export function key(...parts: string[]): string {
  for (const p of parts) if (p === '' || p === '.' || p === '..' || p.includes('\0')) throw new Error(`invalid storage key part ${JSON.stringify(p)}`);
  return parts.join('/');
}

/** The file behind a key, for format code; a backend without local files cannot serve it. */
export function localPathOf(storage: Storage, k: string): string {
  if (!storage.localPath) throw new VaultError(storage.describe(k), 'this storage has no local files (the vhd layout and VHD tools need them)');
  return storage.localPath(k);
}

/** Bytes the given objects or prefixes occupy (a prefix: everything below it). */
export async function bytesBelow(storage: Storage, keys: string[]): Promise<number> {
  let total = 0;
  // A few dozen looked up at once: a merged 8 GiB backup is 4096 block files, and one at a time each waits its turn.
  for (let i = 0; i < keys.length; i += HEADS_AT_ONCE) {
    const sizes = await Promise.all(keys.slice(i, i + HEADS_AT_ONCE).map((k) => bytesAt(storage, k)));
    total += sizes.reduce((a, b) => a + b, 0);
  }
  return total;
}

const HEADS_AT_ONCE = 32;

async function bytesAt(storage: Storage, k: string): Promise<number> {
  const info = await storage.head(k);
  if (!info) return 0;
  return info.prefix ? bytesBelow(storage, (await storage.list(k)).map((name) => key(k, name))) : info.size;
}
