import { existsSync } from 'node:fs';
import { dirname, isAbsolute, join, relative, resolve, sep } from 'node:path';
import { type Compression, isCompression } from '../vhd/compression.js';
import { DEFAULT_BLOCK_SIZE } from '../vhd/constants.js';
import { UsageError, VaultError } from '../util/errors.js';
import { LocalStorage } from '../storage/LocalStorage.js';
import { openStorage } from '../storage/open.js';
import { isS3Uri, parseS3Uri } from '../storage/s3Uri.js';
import { isNotFound, key, localPathOf, type Storage, type StorageDescriptor } from '../storage/Storage.js';
import { checkBackupId, checkDiskName, inUseByAnother, isBackupId, isTemporaryName } from './names.js';
import { ensureReserve } from './reserve.js';
import { SWEEP_MARKER, sweepMarkerKey } from './blockObjects.js';
/**
 * dir: exploded VHD directories; vhd: VHD files (both need a local folder);
 * objects: immutable block objects named by digest plus a block map per backup (any storage, §4.15).
 */
export type Layout = 'dir' | 'vhd' | 'objects';
const LAYOUTS: readonly Layout[] = ['dir', 'vhd', 'objects'];

/** Where a repository is: a folder, or `s3://bucket/prefix` (with an endpoint from --endpoint or the AWS environment). */
export interface Location {
  root: string;
  /** --endpoint: overrides AWS_ENDPOINT_URL(_S3) for an s3:// repository. */
  endpoint?: string;
}

function descriptorOf(location: string | Location): StorageDescriptor {
  const { root, endpoint } = typeof location === 'string' ? { root: location, endpoint: undefined } : location;
  if (!isS3Uri(root)) return { kind: 'local', root: resolve(root) };
  const env = process.env;
  const [from, chosen] = endpoint !== undefined ? ['--endpoint', endpoint] : env.AWS_ENDPOINT_URL_S3 ? ['AWS_ENDPOINT_URL_S3', env.AWS_ENDPOINT_URL_S3] : ['AWS_ENDPOINT_URL', env.AWS_ENDPOINT_URL];
  if (chosen && !/^https?:\/\/[^/\s]+/.test(chosen)) throw new UsageError(`${from} ${chosen}: not an http(s) URL such as http://127.0.0.1:9000`);
  // Resolved here, once: worker threads reopen the storage from this descriptor.
  return { kind: 's3', ...parseS3Uri(root), ...(chosen ? { endpoint: chosen } : {}) };
}

/** `vhdvault.json` at the repository's root. */
export interface RepositoryConfig {
  format: 'vhdvault-repository';
  version: 1;
  layout: Layout;
  compression: Compression;
  blockSize: number;
  createdAt: string;
}

/** `<id>.json`: one backup; its presence is what makes the backup exist. */
export interface BackupMetadata {
  format: 1;
  disk: string;
  id: string;
  kind: 'full' | 'delta';
  parent: string | null;
  createdAt: string;
  /** Virtual size in bytes. */
  size: number;
  blockSize: number;
  blockCount: number;
  layout: Layout;
  compression: Compression;
  /** The VHD's UUID (a child records it as its parent UUID). */
  uuid: string;
  blocksWritten: number;
  /** Bytes of block data this backup stored (after compression). */
  bytesWritten: number;
  /** Bytes the backup occupies: its VHD file or directory and its digests. */
  bytesStored: number;
  digestAlgorithm: 'sha256';
  /** Every stored block has a full sector bitmap (true for all vhdvault backups); lets merges rename blindly. */
  wholeBlocks?: boolean;
  /** A live backup's QEMU dirty bitmap, recording every write since this backup's point in time. */
  checkpoint?: Checkpoint;
}

/** A QEMU dirty bitmap by name, on the disk's format node. */
export interface Checkpoint {
  bitmap: string;
  node: string;
}

/**
 * Metadata of a backup just written by vhdvault (whole blocks, SHA-256 digests),
 * its kind following from its parent. Its size on disk is measured here, on
 * the staged files the commit will rename into place.
 */
export async function newBackupMetadata(
  repo: Repository,
  fields: Pick<BackupMetadata, 'disk' | 'id' | 'size' | 'blockCount' | 'uuid' | 'blocksWritten' | 'bytesWritten' | 'checkpoint'> & { parent: string | null },
): Promise<BackupMetadata> {
  const { layout, compression, blockSize } = repo.config;
  return {
    format: 1,
    ...fields,
    kind: fields.parent ? 'delta' : 'full',
    createdAt: new Date().toISOString(),
    blockSize,
    layout,
    compression: layout === 'vhd' ? 'none' : compression,
    bytesStored: layout === 'objects' ? fields.bytesWritten + fields.blockCount * 32 : await repo.storedBytes([repo.stagedDataKey(fields.disk, fields.id), repo.stagedDigestsKey(fields.disk, fields.id)]),
    digestAlgorithm: 'sha256',
    wholeBlocks: true,
  };
}

const CONFIG_FILE = 'vhdvault.json';
const DISKS_DIR = 'disks';

const jsonText = (value: unknown) => `${JSON.stringify(value, null, 2)}\n`;

function parseJson(bytes: Buffer, where: string): unknown {
  try {
    return JSON.parse(bytes.toString('utf8'));
  } catch {
    throw new VaultError(where, 'is not valid JSON');
  }
}

function parseConfig(value: unknown, path: string): RepositoryConfig {
  const v = value as Partial<RepositoryConfig> | null;
  if (!v || v.format !== 'vhdvault-repository') throw new VaultError(path, 'is not a vhdvault repository file');
  if (v.version !== 1) throw new VaultError(path, `repository format version ${String(v.version)} is not supported`);
  if (!LAYOUTS.includes(v.layout!)) throw new VaultError(path, `unknown layout ${JSON.stringify(v.layout)}`);
  if (!isCompression(v.compression)) throw new VaultError(path, `unknown compression ${JSON.stringify(v.compression)}`);
  if (v.blockSize !== DEFAULT_BLOCK_SIZE) throw new VaultError(path, `unsupported block size ${String(v.blockSize)}`);
  return v as RepositoryConfig;
}

function parseMetadata(value: unknown, path: string, disk: string, id: string): BackupMetadata {
  const m = value as Partial<BackupMetadata> | null;
  // A renamed disk folder: say so, rather than "not valid".
  if (m && typeof m.disk === 'string' && m.disk !== disk) throw new VaultError(path, `is the metadata of a backup of disk "${m.disk}", but it is in the folder of disk "${disk}" (was the folder renamed?)`);
  const ok =
    m !== null &&
    m.format === 1 &&
    m.disk === disk &&
    m.id === id &&
    (m.kind === 'full' || m.kind === 'delta') &&
    (m.parent === null || (typeof m.parent === 'string' && isBackupId(m.parent))) &&
    (m.kind === 'full') === (m.parent === null) &&
    Number.isSafeInteger(m.size) &&
    Number.isSafeInteger(m.blockCount) &&
    m.blockSize === DEFAULT_BLOCK_SIZE &&
    LAYOUTS.includes(m.layout!);
  if (!ok) throw new VaultError(path, 'is not valid backup metadata');
  return m as BackupMetadata;
}

/** The repository a new one's place lies inside (a folder or prefix above it holding vhdvault.json), or null. */
async function enclosingRepository(d: StorageDescriptor): Promise<string | null> {
  if (d.kind === 'local') {
    for (let dir = dirname(d.root); dir !== dirname(dir); dir = dirname(dir)) if (existsSync(join(dir, CONFIG_FILE))) return dir;
    return existsSync(join('/', CONFIG_FILE)) ? '/' : null;
  }
  const parts = d.prefix === '' ? [] : d.prefix.split('/');
  const bucket = await openStorage({ ...d, prefix: '' });
  for (let i = parts.length - 1; i >= 0; i--) {
    const above = parts.slice(0, i);
    if (await bucket.head([...above, CONFIG_FILE].join('/'))) return bucket.describe(above.join('/'));
  }
  return null;
}

/**
 * A repository: its configuration and the names of everything in it, over a
 * storage backend (src/storage). Keys name things; `…Path` methods give the
 * files behind them to the VHD format code, which needs local files.
 */
export class Repository {
  private constructor(
    readonly storage: Storage,
    readonly config: RepositoryConfig,
  ) {}

  /** Where the repository is, as the user named it (for messages). */
  get root(): string {
    return this.storage.describe('');
  }

  /** Create a repository in an empty or missing folder, or under an empty `s3://bucket/prefix`. */
  static async init(location: string | Location, options: { layout?: Layout; compression: Compression }): Promise<Repository> {
    const descriptor = descriptorOf(location);
    const layout = options.layout ?? (descriptor.kind === 's3' ? 'objects' : 'dir');
    if (descriptor.kind === 's3' && layout !== 'objects') {
      throw new UsageError(`an object store holds the objects layout only (the ${layout} layout renames files and writes them in place; S3 can do neither)`);
    }
    if (layout === 'vhd' && options.compression !== 'none') {
      throw new UsageError('compression applies to the dir and objects layouts only (VHD files are stored uncompressed)');
    }
    const storage = await openStorage(descriptor);
    const root = storage.describe('');
    if (await storage.head(CONFIG_FILE)) throw new VaultError(root, 'is already a vhdvault repository');
    const outer = await enclosingRepository(descriptor);
    if (outer !== null) throw new VaultError(root, `is inside the repository ${outer}, whose folders are its own: choose a place outside it`);
    const top = await storage.head('');
    if (top && !top.prefix) throw new VaultError(root, 'exists and is not a folder');
    if (top && (await storage.list('')).length > 0) throw new VaultError(root, `is not empty and is not a vhdvault repository: refusing to use it`);
    const config: RepositoryConfig = {
      format: 'vhdvault-repository',
      version: 1,
      layout,
      compression: options.compression,
      blockSize: DEFAULT_BLOCK_SIZE,
      createdAt: new Date().toISOString(),
    };
    if (!(await storage.put(CONFIG_FILE, jsonText(config), { ifAbsent: true }))) throw new VaultError(root, 'is already a vhdvault repository');
    const repo = new Repository(storage, config);
    await ensureReserve(repo);
    return repo;
  }

  static async open(location: string | Location): Promise<Repository> {
    const storage = await openStorage(descriptorOf(location));
    const info = await storage.head(CONFIG_FILE);
    if (!info) throw new VaultError(storage.describe(''), 'is not a vhdvault repository (no vhdvault.json); create one with `vhdvault init`');
    const config = parseConfig(parseJson(await storage.get(CONFIG_FILE), storage.describe(CONFIG_FILE)), storage.describe(CONFIG_FILE));
    if (config.layout !== 'objects' && !storage.capabilities.localFiles) throw new VaultError(storage.describe(CONFIG_FILE), `says layout ${config.layout}, which needs a local folder`);
    return new Repository(storage, config);
  }

  /** Read a JSON object; errors name the file as the user sees it. */
  async readJson(k: string): Promise<unknown> {
    return parseJson(await this.storage.get(k), this.storage.describe(k));
  }

  /** Store a JSON object whole and durably (readers see the old one or the new one). */
  async writeJson(k: string, value: unknown): Promise<void> {
    await this.storage.put(k, jsonText(value));
  }

  /** Bytes the given objects or prefixes occupy. */
  async storedBytes(keys: string[]): Promise<number> {
    let total = 0;
    for (const k of keys) total += await this.usage(k);
    return total;
  }

  private async usage(k: string): Promise<number> {
    const info = await this.storage.head(k);
    if (!info) return 0;
    if (!info.prefix) return info.size;
    let total = 0;
    for (const name of await this.storage.list(k)) total += await this.usage(key(k, name));
    return total;
  }

  diskKey(disk: string): string {
    return key(DISKS_DIR, checkDiskName(disk));
  }

  /** The object holding a backup's data: its VHD directory or file; in the objects layout, its block map (the digests). */
  dataName(id: string, layout: Layout = this.config.layout): string {
    return `${checkBackupId(id)}.${layout === 'dir' ? 'vhd-dir' : layout === 'vhd' ? 'vhd' : 'digests'}`;
  }

  dataKey(disk: string, id: string, layout?: Layout): string {
    return key(this.diskKey(disk), this.dataName(id, layout));
  }

  digestsKey(disk: string, id: string): string {
    return key(this.diskKey(disk), `${checkBackupId(id)}.digests`);
  }

  metadataKey(disk: string, id: string): string {
    return key(this.diskKey(disk), `${checkBackupId(id)}.json`);
  }

  /** Objects layout: the folder of a disk's block objects (blockObjects.ts). */
  blocksKey(disk: string): string {
    return key(this.diskKey(disk), 'blocks');
  }

  /** Where a backup's data is written before its commit: a temporary name cleanup may remove. */
  stagedDataKey(disk: string, id: string, layout?: Layout): string {
    return key(this.diskKey(disk), stagedName(this.dataName(id, layout)));
  }

  stagedDigestsKey(disk: string, id: string): string {
    return key(this.diskKey(disk), stagedName(`${checkBackupId(id)}.digests`));
  }

  /** Direct mode's copy-before-write target (live/copyStore.ts): never committed, garbage once its backup ends. */
  copiesKey(disk: string, id: string): string {
    return key(this.diskKey(disk), stagedName(`${checkBackupId(id)}.copies`));
  }

  /** The metadata of a backup being committed: while it exists, its staged files are not garbage. */
  pendingMetadataKey(disk: string, id: string): string {
    return key(this.diskKey(disk), stagedName(`${checkBackupId(id)}.json`));
  }

  /** The file behind a key, for the VHD format code (local storage only). */
  path(k: string): string {
    return localPathOf(this.storage, k);
  }

  /** The key of a file below the repository's folder (local storage: format code works with paths). */
  keyOfPath(path: string): string {
    const rel = relative(this.path(''), path);
    if (rel === '' || rel.startsWith('..') || isAbsolute(rel)) throw new Error(`${path} is not inside the repository`);
    return rel.split(sep).join('/');
  }

  /** The disk's folder (or prefix) as the user sees it, for messages. */
  diskDir(disk: string): string {
    return this.storage.describe(this.diskKey(disk));
  }

  dataPath(disk: string, id: string, layout?: Layout): string {
    return this.path(this.dataKey(disk, id, layout));
  }

  /** The digests file (a path, or a URI for messages on an object store). */
  digestsPath(disk: string, id: string): string {
    return this.storage.describe(this.digestsKey(disk, id));
  }

  stagedDataPath(disk: string, id: string, layout?: Layout): string {
    return this.path(this.stagedDataKey(disk, id, layout));
  }

  stagedDigestsPath(disk: string, id: string): string {
    return this.path(this.stagedDigestsKey(disk, id));
  }

  /**
   * Make a staged backup (data and digests under their staged names, durable)
   * exist: its metadata is written under the pending name, the data and digests
   * are renamed into place, and the metadata's rename commits it. A kill at any
   * moment leaves either staged files without pending metadata (garbage: the
   * next cleanup removes them) or pending metadata, which recoverCommits() rolls
   * forward. Data under a final name never lacks metadata that says what it is.
   */
  async commitBackup(meta: BackupMetadata, blockMap?: Buffer): Promise<void> {
    await this.writeJson(this.pendingMetadataKey(meta.disk, meta.id), meta);
    // Objects layout: the map goes in after the pending metadata, so a pending commit without its map is one that never finished (§4.15).
    if (meta.layout === 'objects') await this.storage.put(this.digestsKey(meta.disk, meta.id), blockMap!);
    await this.finishCommit(meta);
    // Every object this backup uploaded is now named by its map: nothing for a sweep to find.
    if (meta.layout === 'objects') await this.storage.delete(sweepMarkerKey(this, meta.disk, meta.id));
  }

  private async finishCommit(meta: BackupMetadata): Promise<void> {
    const { disk, id, layout } = meta;
    if (layout === 'objects') {
      // No renames on an object store: the final metadata is written whole, then the pending copy goes.
      await this.storage.batch([{ put: this.metadataKey(disk, id), data: jsonText(meta) }, { delete: this.pendingMetadataKey(disk, id) }]);
      return;
    }
    const ops = [];
    // A staged name that is gone was renamed by the interrupted run.
    if (await this.storage.head(this.stagedDataKey(disk, id, layout))) ops.push({ rename: this.stagedDataKey(disk, id, layout), to: this.dataKey(disk, id, layout) });
    if (await this.storage.head(this.stagedDigestsKey(disk, id))) ops.push({ rename: this.stagedDigestsKey(disk, id), to: this.digestsKey(disk, id) });
    ops.push({ rename: this.pendingMetadataKey(disk, id), to: this.metadataKey(disk, id) });
    await this.storage.batch(ops);
  }

  /**
   * Finish commits an interrupted backup left (pending metadata whose data and
   * digests are all there, staged or renamed). One that cannot be finished is
   * left as it is, for the findings to report. Call with the disk's lock held.
   */
  async recoverCommits(disk: string): Promise<string[]> {
    const finished: string[] = [];
    for (const name of await this.storage.list(this.diskKey(disk))) {
      const id = pendingId(name);
      if (id === null) continue;
      const meta = await this.readPending(disk, id);
      if (meta && (await this.hasCommitFiles(meta))) {
        await this.finishCommit(meta);
        finished.push(id);
      }
    }
    return finished;
  }

  /** Can the next writer finish this pending commit (its metadata readable, its data and digests there)? */
  async canFinishCommit(disk: string, id: string): Promise<boolean> {
    const meta = await this.readPending(disk, id);
    return meta !== null && (await this.hasCommitFiles(meta));
  }

  private async readPending(disk: string, id: string): Promise<BackupMetadata | null> {
    const k = this.pendingMetadataKey(disk, id);
    try {
      return parseMetadata(await this.readJson(k), this.storage.describe(k), disk, id);
    } catch (err) {
      if (err instanceof VaultError) return null;
      throw err;
    }
  }

  private async hasCommitFiles(meta: BackupMetadata): Promise<boolean> {
    const { disk, id, layout } = meta;
    if (layout === 'objects') return (await this.storage.head(this.digestsKey(disk, id))) !== null;
    const there = async (...keys: string[]) => (await Promise.all(keys.map((k) => this.storage.head(k)))).some((x) => x !== null);
    return (await there(this.stagedDataKey(disk, id, layout), this.dataKey(disk, id, layout))) && (await there(this.stagedDigestsKey(disk, id), this.digestsKey(disk, id)));
  }

  /**
   * Delete a backup for good: its metadata is first renamed to a deletion
   * intent (`.<id>.deleting.tmp`: the backup stops being listed, and what is
   * left of it is known to be garbage), then its data and digests go, the
   * intent last. A killed deletion is finished by the next cleanLeftovers().
   */
  async deleteBackup(meta: BackupMetadata): Promise<void> {
    const [metadata, intent] = [this.metadataKey(meta.disk, meta.id), this.deletingKey(meta.disk, meta.id)];
    // Without renames (an object store) the intent is a copy written before the metadata goes.
    await this.storage.batch(this.storage.rename ? [{ rename: metadata, to: intent }] : [{ put: intent, data: jsonText(meta) }, { delete: metadata }]);
    await this.deleteBackupFiles(meta.disk, meta.id);
  }

  private deletingKey(disk: string, id: string): string {
    return key(this.diskKey(disk), `.${checkBackupId(id)}.deleting.tmp`);
  }

  private async deleteBackupFiles(disk: string, id: string): Promise<void> {
    if (this.config.layout === 'objects') {
      // Objects, not folders: no listing below each name. The map first, the intent last.
      await this.storage.deleteMany([this.digestsKey(disk, id)]);
      await this.storage.deleteMany([this.deletingKey(disk, id)]);
      return;
    }
    await this.storage.batch([
      { delete: this.dataKey(disk, id, 'dir') },
      { delete: this.dataKey(disk, id, 'vhd') },
      { delete: this.digestsKey(disk, id) },
      { delete: this.deletingKey(disk, id) },
    ]);
  }

  /** A disk named on the command line must exist: a misspelt name must not read as "nothing wrong". */
  async requireDisk(disk: string): Promise<string> {
    if (!(await this.storage.head(this.diskKey(disk)))) throw new VaultError(this.root, `has no disk named ${disk}`);
    return disk;
  }

  async disks(): Promise<string[]> {
    return (await this.storage.list(DISKS_DIR)).filter((name) => !name.startsWith('.'));
  }

  /** Committed backups of a disk, oldest first. Unreadable metadata is reported through `onProblem`. */
  async backups(disk: string, onProblem: (err: VaultError) => void = () => undefined): Promise<BackupMetadata[]> {
    const out: BackupMetadata[] = [];
    for (const name of await this.storage.list(this.diskKey(disk))) {
      const id = name.replace(/\.json$/, '');
      if (!name.endsWith('.json') || !isBackupId(id)) continue;
      const k = key(this.diskKey(disk), name);
      try {
        out.push(parseMetadata(await this.readJson(k), this.storage.describe(k), disk, id));
      } catch (err) {
        if (!(err instanceof VaultError)) throw err;
        onProblem(err);
      }
    }
    return out;
  }

  async backup(disk: string, id: string): Promise<BackupMetadata> {
    const k = this.metadataKey(disk, id);
    try {
      return parseMetadata(await this.readJson(k), this.storage.describe(k), disk, id);
    } catch (err) {
      if (isNotFound(err)) throw new VaultError(this.diskDir(disk), `has no backup ${id}`);
      throw err;
    }
  }

  async latest(disk: string): Promise<BackupMetadata | undefined> {
    return (await this.backups(disk)).at(-1);
  }

  /**
   * Remove what interrupted runs left, and nothing else: names that are ours
   * and temporary (`.<name>.tmp`), unless pending metadata still claims them.
   * Data or digests without metadata are never removed here: the findings
   * report them. Call with the disk's lock held, after recoverCommits().
   */
  /**
   * What a merge set aside (`.<P>.replaced.tmp`: the removed backup's replaced blocks;
   * `.<C-data>.merged.tmp`: the child's old data) is garbage once the merge committed.
   * Its journal is gone then — but also if someone removed it by hand mid-merge, when
   * these may be all that is left of a backup. So look: committed means P is no longer
   * listed, and C's recorded parent (if any) is listed with its data there.
   */
  private async mergeLeftoverIsGarbage(disk: string, name: string, names: string[]): Promise<boolean> {
    const replacedOf = /^\.(.+)\.replaced\.tmp$/.exec(name)?.[1];
    if (replacedOf !== undefined) return isBackupId(replacedOf) && !names.includes(`${replacedOf}.json`);
    const mergedOf = /^\.(.+)\.(vhd-dir|vhd)\.merged\.tmp$/.exec(name)?.[1];
    if (mergedOf === undefined) return true;
    if (!isBackupId(mergedOf)) return false;
    const child = await this.backup(disk, mergedOf).catch(() => null);
    if (!child || !names.includes(this.dataName(child.id, child.layout))) return false;
    if (child.parent === null) return true;
    const parent = await this.backup(disk, child.parent).catch(() => null);
    return parent !== null && names.includes(this.dataName(parent.id, parent.layout));
  }

  async cleanLeftovers(disk: string): Promise<string[]> {
    // Deletions a killed prune began: the backup's files first, the intent last.
    for (const name of await this.storage.list(this.diskKey(disk))) {
      const id = deletingId(name);
      if (id !== null) await this.deleteBackupFiles(disk, id);
    }
    // Objects layout: a pending commit whose block map never arrived is a backup that never finished (§4.15).
    for (const name of await this.storage.list(this.diskKey(disk))) {
      const id = pendingId(name);
      const meta = id === null ? null : await this.readPending(disk, id);
      if (meta?.layout === 'objects' && !(await this.hasCommitFiles(meta))) await this.storage.delete(key(this.diskKey(disk), name));
    }
    const names = await this.storage.list(this.diskKey(disk));
    const claimed = new Set(names.map(pendingId).filter((id): id is string => id !== null));
    const removed: string[] = [];
    for (const name of names) {
      // A sweep marker (objects layout) is removed only by the collection it asks for (blockObjects.ts).
      if (!isTemporaryName(name) || pendingId(name) !== null || SWEEP_MARKER.test(name)) continue;
      // Another live process's work in progress (a lock being acquired right now, say) is not ours to remove.
      if (inUseByAnother(name)) continue;
      const stagedOf = /^\.(\d{8}T\d{9}Z-[0-9a-f]{6})\.(vhd-dir|vhd|digests)\.tmp$/.exec(name)?.[1];
      if (stagedOf !== undefined && claimed.has(stagedOf)) continue;
      if (!(await this.mergeLeftoverIsGarbage(disk, name, names))) continue;
      await this.storage.delete(key(this.diskKey(disk), name));
      removed.push(name);
    }
    return removed;
  }
}

const stagedName = (name: string) => `.${name}.tmp`;

/** The backup id of a deletion intent (`.<id>.deleting.tmp`), else null. */
export function deletingId(name: string): string | null {
  const m = /^\.(.+)\.deleting\.tmp$/.exec(name);
  return m && isBackupId(m[1]!) ? m[1]! : null;
}

/** The backup id of a pending metadata name (`.<id>.json.tmp`), else null. */
export function pendingId(name: string): string | null {
  const m = /^\.(.+)\.json\.tmp$/.exec(name);
  return m && isBackupId(m[1]!) ? m[1]! : null;
}
