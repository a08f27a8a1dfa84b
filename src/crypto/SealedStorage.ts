import type { BatchOp, DeleteOptions, ListedObject, ObjectInfo, PutData, Storage, StorageCapabilities, StorageDescriptor } from '../storage/Storage.js';
import { OVERHEAD, open, seal, sealPieces } from './aead.js';
import type { MasterKey } from './keyring.js';

/**
 * What an object is bound to (its associated data), from its storage key; null
 * for the few objects that stay plain (docs/design/12-encryption.md §12.4).
 * The repository supplies it: it knows what its keys mean.
 */
export type BindingOf = (key: string) => string | null;

/**
 * An encrypted repository's storage: every object but the plain ones is
 * sealed on its way in and opened on its way out, so the code above sees the
 * plaintext world it was written for. Renames pass through untouched — the
 * binding names where an object belongs, not the temporary name it is
 * written under — so commits and merges stay renames.
 */
export class SealedStorage implements Storage {
  readonly capabilities: StorageCapabilities;
  readonly rename?: (from: string, to: string) => Promise<void>;
  readonly moveAll?: (pairs: Array<[from: string, to: string]>, options?: { ignoreMissing?: boolean; durable?: boolean }) => Promise<void>;
  readonly localPath?: (key: string) => string;

  constructor(
    private readonly inner: Storage,
    private readonly master: MasterKey,
    private readonly bindingOf: BindingOf,
  ) {
    this.capabilities = { ...inner.capabilities, rangedReads: false };
    if (inner.rename) this.rename = inner.rename.bind(inner);
    if (inner.moveAll) this.moveAll = inner.moveAll.bind(inner);
    if (inner.localPath) this.localPath = inner.localPath.bind(inner);
  }

  get descriptor(): StorageDescriptor {
    return this.inner.descriptor;
  }

  describe(key: string): string {
    return this.inner.describe(key);
  }

  /** The bytes to store for `key`: sealed, unless the key is one of the plain ones (then as given). */
  private sealed(key: string, data: Buffer | string): Buffer | string {
    const ad = this.bindingOf(key);
    return ad === null ? data : seal(this.master.cipher, this.master.dataKey, typeof data === 'string' ? Buffer.from(data) : data, ad);
  }

  /** The plaintext of what is stored at `key`; a VaultError naming it when it does not open there. */
  private openAt(key: string, stored: Buffer): Buffer {
    const ad = this.bindingOf(key);
    return ad === null ? stored : open(this.master.dataKey, stored, ad, this.describe(key));
  }

  async get(key: string, range?: { offset: number; length: number }): Promise<Buffer> {
    if (this.bindingOf(key) === null) return this.inner.get(key, range);
    // A tag covers the whole object: nothing of it is trusted until all of it is read.
    const plaintext = this.openAt(key, await this.inner.get(key));
    return range ? plaintext.subarray(range.offset, range.offset + range.length) : plaintext;
  }

  async head(key: string): Promise<ObjectInfo | null> {
    const info = await this.inner.head(key);
    return info && !info.prefix ? { ...info, size: this.plainSize(key, info.size) } : info;
  }

  list(prefix: string): Promise<string[]> {
    return this.inner.list(prefix);
  }

  put(key: string, data: PutData, options?: { ifAbsent?: boolean }): Promise<boolean> {
    const ad = this.bindingOf(key);
    if (ad === null) return this.inner.put(key, data, options);
    // As pieces: a block object is not copied to join its envelope.
    const pieces = typeof data === 'string' ? [Buffer.from(data)] : Buffer.isBuffer(data) ? [data] : data;
    return this.inner.put(key, sealPieces(this.master.cipher, this.master.dataKey, pieces, ad), options);
  }

  create(key: string, parts: Uint8Array[]): Promise<void> {
    if (this.bindingOf(key) === null) return this.inner.create(key, parts);
    // The pieces (a bitmap and a block) go through the cipher in turn: no joined copy.
    return this.inner.create(key, sealPieces(this.master.cipher, this.master.dataKey, parts, this.bindingOf(key)!));
  }

  sync(prefix: string): Promise<void> {
    return this.inner.sync(prefix);
  }

  delete(key: string, options?: DeleteOptions): Promise<void> {
    return this.inner.delete(key, options);
  }

  deleteMany(keys: string[]): Promise<void> {
    return this.inner.deleteMany(keys);
  }

  async *listAll(prefix: string): AsyncIterable<ListedObject> {
    for await (const o of this.inner.listAll(prefix)) yield { ...o, size: this.plainSize(o.key, o.size) };
  }

  batch(ops: BatchOp[]): Promise<void> {
    return this.inner.batch(ops.map((op) => ('put' in op ? { put: op.put, data: this.sealed(op.put, op.data) } : op)));
  }

  /** What the code above sees as an object's size: its plaintext's (a damaged, shorter object counts as empty). */
  private plainSize(key: string, stored: number): number {
    return this.bindingOf(key) === null ? stored : Math.max(0, stored - OVERHEAD);
  }
}
