import { fullBitmap } from '../../vhd/bitmap.js';
import type { StoredBlock, VhdDisk } from '../../vhd/disk.js';
import { type Footer, newFooter } from '../../vhd/footer.js';
import { type DynamicHeader, newHeader } from '../../vhd/header.js';
import { toVhdTimestamp } from '../../vhd/timestamp.js';
import { type BlockMap, blockObjectKey, loadBlockMap, readBlockObject } from './blockObjects.js';
import { isNotFound } from '../../storage/Storage.js';
import { VaultError } from '../../util/errors.js';
import { SharedObjectError } from '../finding.js';
import { digestsKey } from '../keys.js';
import type { BackupMetadata } from '../metadata.js';
import type { LayoutContext } from './Layout.js';

/**
 * A backup of the objects layout seen as a dynamic VHD: its block map is the
 * whole disk (a delta's map names its parent's objects too), so it is a chain
 * of one. What restore, verify, serve and convert read through VhdChain.
 */
export class ObjectBackupDisk implements VhdDisk {
  readonly footer: Footer;
  readonly header: DynamicHeader;

  private constructor(
    private readonly repo: LayoutContext,
    private readonly meta: BackupMetadata,
    readonly map: BlockMap,
  ) {
    this.footer = { ...newFooter('dynamic', meta.size, meta.uuid), timestamp: toVhdTimestamp(new Date(meta.createdAt)) };
    this.header = newHeader(meta.blockCount, meta.blockSize);
  }

  static async open(repo: LayoutContext, meta: BackupMetadata, options: { fresh?: boolean } = {}): Promise<ObjectBackupDisk> {
    return new ObjectBackupDisk(repo, meta, await loadBlockMap(repo, meta, options));
  }

  get path(): string {
    return this.repo.storage.describe(digestsKey(this.meta.disk, this.meta.id));
  }

  get size(): number {
    return this.meta.size;
  }

  get blockSize(): number {
    return this.meta.blockSize;
  }

  get blockCount(): number {
    return this.meta.blockCount;
  }

  isAllocated(block: number): boolean {
    return this.map.hasObject(block);
  }

  async readBlock(block: number): Promise<StoredBlock | null> {
    if (!this.isAllocated(block)) return null;
    return { bitmap: fullBitmap(this.blockSize), data: await readBlockObject(this.repo, this.meta, this.map.digest(block)) };
  }

  /**
   * Whether readBlockRange() reads part of a block object in place: an
   * uncompressed object holds the block's bytes as they are, and the storage
   * reads a range of it (a sealed object is opened whole).
   */
  get rangeReads(): boolean {
    return this.meta.compression === 'none' && this.repo.storage.capabilities.rangedReads;
  }

  /** Part of an allocated block, read from its object (a served 4 KiB read, after the block was checked whole). */
  async readBlockRange(block: number, offset: number, length: number): Promise<Buffer> {
    const k = blockObjectKey(this.meta.disk, this.map.digest(block));
    const data = await this.repo.storage.get(k, { offset, length }).catch((err: unknown) => {
      throw isNotFound(err) ? new SharedObjectError(this.repo.storage.describe(k), 'block object is missing', this.meta.id) : err;
    });
    if (data.length !== length) throw new VaultError(this.repo.storage.describe(k), `block object is shorter than a block (${this.blockSize} bytes)`);
    return data;
  }

  async readLocatorData(): Promise<Buffer | null> {
    return null;
  }

  async close(): Promise<void> {}
}
