import type { Storage, StorageCapabilities } from '../../storage/Storage.js';
import type { Compression } from '../../vhd/compression.js';
import type { VhdDisk } from '../../vhd/disk.js';
import type { VhdChain } from '../../vhd/VhdChain.js';
import type { ChunkSeal } from '../../vhd/chunkSeal.js';
import type { Digester } from '../digests.js';
import type { Sealing } from '../sealing.js';
import type { BlockOutput, BlockTarget } from '../blockTask.js';
import type { Finding } from '../finding.js';
import type { BackupMetadata, LayoutName, RepositoryConfig } from '../metadata.js';

/**
 * How backups are stored: one driver per layout (dir.ts, vhd.ts, objects.ts)
 * behind this interface. The repository and everything above it ask the
 * backup's layout (Repository.layoutOf) and never compare layout names.
 */

/** What a layout driver sees of its repository (the Repository is one). */
export interface LayoutContext {
  readonly storage: Storage;
  readonly config: RepositoryConfig;
  /** Where the repository is, as the user named it (for messages). */
  readonly root: string;
  /** A disk's folder as the user sees it (for messages). */
  diskDir(disk: string): string;
  /** A committed backup; a VaultError when the disk has none of that id. */
  backup(disk: string, id: string): Promise<BackupMetadata>;
  /** The file behind a key, for layouts whose data is local by nature: the one place paths come from. */
  localPath(key: string): string;
  /** How blocks are digested (keyed in an encrypted repository). */
  readonly digester: Digester;
  /** What worker threads need to seal as the storage does; null when the repository is plain. */
  readonly sealing: Sealing | null;
  /** How a disk's VHD directory files are sealed when read or written in place; undefined when plain. */
  directorySeal(disk: string): ChunkSeal | undefined;
}

/** One digest per block of the disk at a backup (docs/design/04-repository.md §4.4). */
export interface Digests {
  get(block: number): Promise<Buffer>;
  close(): Promise<void>;
  /** The whole digests object, when it is held in memory (a block map). */
  readonly bytes?: Buffer;
}

/** A new backup, as a writer is asked to create it. */
export interface WriterSpec {
  disk: string;
  id: string;
  size: number;
  blockCount: number;
  /** The new backup's VHD UUID. */
  uuid: string;
  /** The backup this one is a delta of; null for a full. */
  parent: BackupMetadata | null;
  /** The parent's digests: blocks the store already holds (the objects layout names them rather than upload them). */
  previous: Digests | null;
  /** The VHD footer's timestamp to record (a replica keeps its source's); default: now. */
  timestamp?: number;
}

/** A block to store as given (replication): its sector bitmap and data, and its stored bytes when already in the writer's codec. */
export interface GivenBlock {
  bitmap: Buffer;
  data: Buffer;
  stored?: Buffer;
}

/** A backup being written under staged names; the repository commits it. */
export interface BackupWriter {
  /** The codec of stored blocks. */
  readonly codec: Compression;
  /** Blocks are stored bare (the data alone), without a VHD sector bitmap. */
  readonly bare: boolean;
  /** Stored blocks are block files in `codec`, whose bytes a replica of the same codec may copy as they are; null otherwise. */
  readonly storedCodec: Compression | null;
  /** Blocks are written by the main thread, in order: that is where the write stage is timed. */
  readonly writesInOrder: boolean;
  /** What a worker does with `block`; `paced`: its write must wait for the rate limiter. */
  output(block: number, paced: boolean): Promise<BlockOutput>;
  /** Where prepared bytes of `block` go, or null when it need not be stored after all (already in the store). */
  place(block: number, digest: Buffer): BlockTarget | null;
  /** In block order, for each block stored: the main thread's part (`data`: what output 'data' handed back). */
  record(block: number, data: Buffer | null): Promise<void>;
  /** Store a block as given, in block order; resolves to the bytes stored. */
  storeBlock(block: number, given: GivenBlock): Promise<number>;
  /** All blocks are in: make them durable and stage the digests (one per block of the disk). */
  finish(digests: Buffer): Promise<void>;
  /** Remove everything staged. */
  abort(): Promise<void>;
  /** Bytes the staged backup occupies, for its metadata. */
  storedBytes(bytesWritten: number): Promise<number>;
}

/** `merge.json`: a retention merge in progress (store/merge.ts runs it; the layout supplies its steps). */
export interface MergeJournal {
  format: 1;
  /** The backup being removed. */
  parent: BackupMetadata;
  /** The backup above it: the merged result takes its identity and name. */
  child: BackupMetadata;
  /** The next step to run: one of the layout's steps, or 'metadata' (the commit). */
  step: string;
  [field: string]: unknown;
}

/** A layout's part of a retention merge. Every step is idempotent: a resumed run redoes the one it was in. */
export interface LayoutMerge {
  /** Steps before the commit, in order. */
  readonly steps: readonly string[];
  /** The journal's fields of this layout, computed before anything changes. */
  begin(ctx: LayoutContext, parent: BackupMetadata, child: BackupMetadata): Promise<Record<string, unknown>>;
  /** Are this layout's fields of a journal well formed? */
  sound(journal: MergeJournal): boolean;
  /** What about the disk does not match the journal's step (a stale or copied journal), or null. */
  mismatch(ctx: LayoutContext, journal: MergeJournal): Promise<string | null>;
  run(ctx: LayoutContext, journal: MergeJournal, step: string, resumed: boolean): Promise<void>;
  /** The child's metadata once merged: what the commit writes. */
  merged(journal: MergeJournal): BackupMetadata;
  /** After the commit: free what the merge set aside and recount the result's size. */
  reclaim(ctx: LayoutContext, journal: MergeJournal): Promise<void>;
  /**
   * A temporary name a merge of this layout sets aside: is it garbage now?
   * null when the name is not one of them.
   */
  leftover(ctx: LayoutContext, disk: string, name: string, names: string[]): Promise<boolean | null>;
}

/** What a prune does around removing backups (the objects layout collects the objects they alone named). */
export interface Removal {
  /** Before any of `removed` is deleted or merged away. */
  before(removed: BackupMetadata[]): Promise<void>;
  /** Once they are gone: the number of stored objects freed besides them. */
  after(): Promise<number>;
}

export interface Layout {
  readonly name: LayoutName;
  /** Can its repository be encrypted (every object sealed whole)? Not when data is written in place. */
  readonly sealable: boolean;
  /** Why this layout cannot live on storage with these capabilities, or null. */
  unsupportedOn(capabilities: StorageCapabilities): string | null;
  /** Refuse a repository codec the layout cannot store (a UsageError). */
  checkCompression(compression: Compression): void;
  /** The codec its backups record, given the repository's. */
  storedCompression(compression: Compression): Compression;
  /** The name, in the disk's folder, of a backup's data: its id and this suffix. */
  readonly dataSuffix: string;
  dataName(id: string): string;
  /** The backup id when `name` is this layout's data as a VHD the `vhd` tools read; else null. */
  vhdDataId(name: string): string | null;

  createWriter(ctx: LayoutContext, spec: WriterSpec): Promise<BackupWriter>;
  /** After the pending metadata is written: store what else the commit needs and commit (metadata last). */
  commit(ctx: LayoutContext, meta: BackupMetadata, digests: Buffer | null): Promise<void>;
  /** Are the data and digests of a pending commit all there (staged or in place)? */
  hasCommitFiles(ctx: LayoutContext, meta: BackupMetadata): Promise<boolean>;
  /** Roll a pending commit forward (its files are all there). */
  finishCommit(ctx: LayoutContext, meta: BackupMetadata): Promise<void>;
  /** A pending commit that provably never finished, to be removed by cleanup (rather than reported). */
  abandoned(ctx: LayoutContext, meta: BackupMetadata): Promise<boolean>;
  /** Delete a backup's data and digests, then its deletion intent. */
  deleteFiles(ctx: LayoutContext, disk: string, id: string): Promise<void>;
  /** A temporary name cleanup must leave (it is removed by whatever it asks for). */
  keepsTemporary(name: string): boolean;

  /** One backup's own data as a VHD (checked against its metadata's UUID). */
  openData(ctx: LayoutContext, meta: BackupMetadata, options?: { fresh?: boolean }): Promise<VhdDisk>;
  /** What a restore reads: the backup's chain, resolved by metadata. `fresh`: not from a local cache. */
  openChain(ctx: LayoutContext, meta: BackupMetadata, options?: { fresh?: boolean }): Promise<VhdChain>;
  openDigests(ctx: LayoutContext, meta: BackupMetadata, options?: { fresh?: boolean }): Promise<Digests>;
  /**
   * Blocks are stored once per disk and named by their digest, and a backup's
   * map is the whole disk: verify reads each stored block once, and there is no
   * parent to hold the blocks a backup does not store.
   */
  readonly sharedBlocks: boolean;
  /** A stored block's bytes as stored, in storedCodec (replication copies them as they are). */
  readStored(ctx: LayoutContext, meta: BackupMetadata, block: number): Promise<Buffer>;
  /** The codec of a backup's stored block files, or null when they are not separate block files. */
  storedCodec(meta: BackupMetadata): Compression | null;

  /** Files a backup needs that are not among its disk folder's `names`. */
  missingFiles(ctx: LayoutContext, meta: BackupMetadata, names: ReadonlySet<string>): Array<Pick<Finding, 'kind' | 'problem'>>;
  /** What is wrong with these backups' structure, without reading block data. */
  /**
   * `digests`: also read each backup's digests whole and check they are its own
   * (what a prune needs before it deletes any; a backup building on its chain does not).
   */
  structureFindings(ctx: LayoutContext, backups: BackupMetadata[], options?: { digests?: boolean }): Promise<Finding[]>;

  readonly merge: LayoutMerge;
  /** A prune's removal of backups of `disk`. */
  removal(ctx: LayoutContext, disk: string): Removal;
}
