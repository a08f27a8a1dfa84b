import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import type { Compression } from '../vhd/compression.js';
import { DEFAULT_BLOCK_SIZE } from '../vhd/constants.js';
import { UsageError, VaultError } from '../util/errors.js';
import { nearest } from '../util/suggest.js';
import { openStorage } from '../storage/open.js';
import { isS3Uri, parseS3Uri } from '../storage/s3Uri.js';
import { bytesBelow, isNotFound, isUnavailable, key, localPathOf, NotFoundError, type Storage, type StorageDescriptor } from '../storage/Storage.js';
import { createKeyring, KEYS } from '../crypto/keyring.js';
import { type Cipher } from '../crypto/aead.js';
import { type PasswordSources, readNewPassword } from '../crypto/password.js';
import type { ChunkSeal } from '../vhd/chunkSeal.js';
import { type Digester, digesterFor, digestsSha256, SHA256_DIGESTER } from './digests.js';
import { directorySeal, newRepositoryId, type Sealing, sealedStorage, sealingOf, unlock, type Unlocked } from './sealing.js';
import * as keys from './keys.js';
import { defaultLayout, layoutNamed } from './layouts/index.js';
import type { Layout } from './layouts/Layout.js';
import { type BackupMetadata, jsonText, type LayoutName, metadataText, parseConfig, parseJson, parseMetadata, type RepositoryConfig } from './metadata.js';
import { inUseByAnother, isBackupId, isTemporaryName } from './names.js';
import { ensureReserve } from './reserve.js';
import { looksSealed } from '../util/sealedMagic.js';

export type { BackupMetadata, Checkpoint, LayoutName, RepositoryConfig } from './metadata.js';

/** Where a repository is: a folder, or `s3://bucket/prefix` (with an endpoint from --endpoint or the AWS environment). */
export interface Location {
  root: string;
  /** --endpoint: overrides AWS_ENDPOINT_URL(_S3) for an s3:// repository. */
  endpoint?: string;
}

/** Where an encrypted repository's password comes from (default: VHDVAULT_PASSWORD, --password-file, VHDVAULT_PASSWORD_COMMAND, a prompt). */
export interface OpenOptions {
  password?: PasswordSources;
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

/**
 * Metadata of a backup just written by vhdvault (whole blocks, SHA-256 digests),
 * its kind following from its parent; `bytesStored` is measured by its writer,
 * and `digests` (one per block) are bound to it by their SHA-256.
 */
export function newBackupMetadata(
  repo: Repository,
  fields: Pick<BackupMetadata, 'disk' | 'id' | 'size' | 'blockCount' | 'uuid' | 'blocksWritten' | 'bytesWritten' | 'bytesStored' | 'checkpoint'> & { parent: string | null },
  digests: Buffer,
): BackupMetadata {
  const { layout, compression, blockSize } = repo.config;
  return {
    format: 1,
    ...fields,
    kind: fields.parent ? 'delta' : 'full',
    createdAt: new Date().toISOString(),
    blockSize,
    layout,
    compression: repo.layout.storedCompression(compression),
    digestAlgorithm: repo.digester.algorithm,
    digestsSha256: digestsSha256(digests),
    wholeBlocks: true,
  };
}

/** The repository a new one's place lies inside (a folder or prefix above it holding vhdvault.json), or null. */
async function enclosingRepository(d: StorageDescriptor): Promise<string | null> {
  if (d.kind === 'local') {
    for (let dir = dirname(d.root); dir !== dirname(dir); dir = dirname(dir)) if (existsSync(join(dir, keys.CONFIG_FILE))) return dir;
    return existsSync(join('/', keys.CONFIG_FILE)) ? '/' : null;
  }
  const parts = d.prefix === '' ? [] : d.prefix.split('/');
  const bucket = await openStorage({ ...d, prefix: '' });
  for (let i = parts.length - 1; i >= 0; i--) {
    const above = parts.slice(0, i);
    if (await bucket.head([...above, keys.CONFIG_FILE].join('/'))) return bucket.describe(above.join('/'));
  }
  return null;
}

/**
 * What an encrypted init killed after its key file and before vhdvault.json
 * leaves: `keys/` holding key files and nothing else anywhere. Such a key
 * file opens nothing (no repository recorded its id, and nothing was written
 * under it): it is removed, and the init goes on. True when that was all.
 */
async function removeInitLeftover(storage: Storage): Promise<boolean> {
  if ((await storage.list('')).join('/') !== KEYS) return false;
  const names = await storage.list(KEYS);
  // Key files, and the temporary file of one whose put was killed.
  if (names.length === 0 || names.length > 32 || !names.every((n) => /^\.?[0-9a-f]{16}\.json(\.\d+\.[0-9a-f]+\.tmp)?$/.test(n))) return false;
  await storage.deleteMany(names.map((n) => key(KEYS, n)));
  await storage.delete(KEYS);
  return (await storage.list('')).length === 0;
}

async function readConfig(storage: Storage): Promise<{ config: RepositoryConfig; where: string }> {
  const info = await storage.head(keys.CONFIG_FILE);
  if (!info) throw new VaultError(storage.describe(''), 'is not a vhdvault repository (no vhdvault.json); create one with `vhdvault init`');
  const where = storage.describe(keys.CONFIG_FILE);
  return { config: parseConfig(parseJson(await storage.get(keys.CONFIG_FILE), where), where), where };
}

/**
 * A repository: its configuration and the names of everything in it, over a
 * storage backend (src/storage), with its layout's driver (layouts/). Keys name
 * things; a layout local by nature gets the file behind a key from localPath().
 */
export class Repository {
  /** The driver of the repository's layout: how its backups are written. */
  readonly layout: Layout;
  /** How blocks are digested: SHA-256, or HMAC-SHA256 under the MAC key when encrypted. */
  readonly digester: Digester;

  private constructor(
    readonly storage: Storage,
    readonly config: RepositoryConfig,
    private readonly unlocked: Unlocked | null,
  ) {
    this.layout = layoutNamed(config.layout);
    this.digester = unlocked ? digesterFor(unlocked.sealing.macKey) : SHA256_DIGESTER;
  }

  /** An encrypted repository's keys, as worker threads receive them; null when it is plain. */
  get sealing(): Sealing | null {
    return this.unlocked?.sealing ?? null;
  }

  /** The key file this process opened the repository with (the key in use); null when it is plain. */
  get keyInUse(): string | null {
    return this.unlocked?.keyId ?? null;
  }

  /** How the files of a disk's VHD directories are sealed (in place, by the dir layout); undefined when plain. */
  directorySeal(disk: string): ChunkSeal | undefined {
    return this.unlocked ? directorySeal(this.unlocked.sealing, disk) : undefined;
  }

  /** Where the repository is, as the user named it (for messages). */
  get root(): string {
    return this.storage.describe('');
  }

  /** Create a repository in an empty or missing folder, or under an empty `s3://bucket/prefix`. */
  static async init(location: string | Location, options: { layout?: LayoutName; compression: Compression; encryption?: Cipher; password?: PasswordSources }): Promise<Repository> {
    const descriptor = descriptorOf(location);
    const storage = await openStorage(descriptor);
    const layout = options.layout ? layoutNamed(options.layout) : defaultLayout(storage.capabilities);
    const unsupported = layout.unsupportedOn(storage.capabilities);
    if (unsupported) throw new UsageError(`an object store holds the objects layout only (${unsupported}; S3 can do neither)`);
    layout.checkCompression(options.compression);
    if (options.encryption && !layout.sealable) throw new UsageError(`the ${layout.name} layout writes VHD files in place and cannot be encrypted: use --layout dir or objects`);
    const root = storage.describe('');
    if (await storage.head(keys.CONFIG_FILE)) throw new VaultError(root, 'is already a vhdvault repository');
    const outer = await enclosingRepository(descriptor);
    if (outer !== null) throw new VaultError(root, `is inside the repository ${outer}, whose folders are its own: choose a place outside it`);
    const top = await storage.head('');
    if (top && !top.prefix) throw new VaultError(root, 'exists and is not a folder');
    if (top && (await storage.list('')).length > 0 && !(await removeInitLeftover(storage))) throw new VaultError(root, `is not empty and is not a vhdvault repository: refusing to use it`);
    // Only the repository's own folder is made: a mistyped parent would otherwise quietly become a new tree.
    if (descriptor.kind === 'local' && !top && !existsSync(dirname(descriptor.root))) {
      throw new VaultError(root, `its parent folder ${dirname(descriptor.root)} does not exist: create it first (init makes only the repository's own folder)`);
    }
    const config: RepositoryConfig = {
      format: 'vhdvault-repository',
      version: 1,
      layout: layout.name,
      compression: options.compression,
      blockSize: DEFAULT_BLOCK_SIZE,
      createdAt: new Date().toISOString(),
      ...(options.encryption ? { encryption: { cipher: options.encryption, id: newRepositoryId() } } : {}),
    };
    // The password is asked for before anything is written: giving up leaves nothing behind.
    const password = config.encryption ? await readNewPassword(root, options.password) : null;
    // Key file first, configuration last: a repository whose vhdvault.json exists can be opened.
    const keyring = config.encryption && password !== null ? await createKeyring(storage, password, config.encryption.cipher) : null;
    if (!(await storage.put(keys.CONFIG_FILE, jsonText(config), { ifAbsent: true }))) throw new VaultError(root, 'is already a vhdvault repository');
    await ensureReserve(storage);
    if (!config.encryption || !keyring) return new Repository(storage, config, null);
    const opened = { sealing: sealingOf(keyring.master, config.encryption.id), keyId: keyring.keyId };
    return new Repository(sealedStorage(storage, opened.sealing), config, opened);
  }

  /** A repository's configuration, read without opening it (no password asked). */
  static async configOf(location: string | Location): Promise<RepositoryConfig> {
    return (await readConfig(await openStorage(descriptorOf(location)))).config;
  }

  static async open(location: string | Location, options: OpenOptions = {}): Promise<Repository> {
    const storage = await openStorage(descriptorOf(location));
    const { config, where } = await readConfig(storage);
    const layout = layoutNamed(config.layout);
    if (layout.unsupportedOn(storage.capabilities)) throw new VaultError(where, `says layout ${config.layout}, which needs a local folder`);
    if (!config.encryption) {
      // Key files in a repository said to be plain: vhdvault.json was edited, and backups written now would be plain.
      if ((await storage.list(KEYS)).length > 0) throw new VaultError(where, `says the repository is not encrypted, but ${storage.describe(KEYS)} holds key files: refusing to write plaintext into it (was vhdvault.json replaced?)`);
      return new Repository(storage, config, null);
    }
    if (!layout.sealable) throw new VaultError(where, `says layout ${config.layout}, which cannot be encrypted`);
    const opened = await unlock(storage, config.encryption, options.password ?? {});
    return new Repository(sealedStorage(storage, opened.sealing), config, opened);
  }

  /** The driver of a backup's layout. */
  layoutOf(meta: Pick<BackupMetadata, 'layout'>): Layout {
    return layoutNamed(meta.layout);
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
  storedBytes(keyList: string[]): Promise<number> {
    return bytesBelow(this.storage, keyList);
  }

  diskKey(disk: string): string {
    return keys.diskKey(disk);
  }

  /** The object holding a backup's data (its VHD directory or file; in the objects layout, its block map). */
  dataKey(meta: Pick<BackupMetadata, 'disk' | 'id' | 'layout'>): string {
    return keys.inDisk(meta.disk, this.layoutOf(meta).dataName(meta.id));
  }

  digestsKey(disk: string, id: string): string {
    return keys.digestsKey(disk, id);
  }

  metadataKey(disk: string, id: string): string {
    return keys.metadataKey(disk, id);
  }

  /** Objects layout: the folder of a disk's block objects. */
  blocksKey(disk: string): string {
    return keys.blocksKey(disk);
  }

  /** Direct mode's copy-before-write target (live/copyStore.ts): never committed, garbage once its backup ends. */
  copiesKey(disk: string, id: string): string {
    return keys.copiesKey(disk, id);
  }

  pendingMetadataKey(disk: string, id: string): string {
    return keys.pendingMetadataKey(disk, id);
  }

  /**
   * The file behind a key, for data that is local by nature (VHD files written
   * in place, VHD directories, direct mode's copy file): the one place a path
   * is made from a key. Storage without local files refuses.
   */
  localPath(k: string): string {
    return localPathOf(this.storage, k);
  }

  /** The disk's folder (or prefix) as the user sees it, for messages. */
  diskDir(disk: string): string {
    return this.storage.describe(this.diskKey(disk));
  }

  /**
   * Make a staged backup (data and digests under their staged names, durable)
   * exist: its metadata is written under the pending name, then the layout
   * puts its data and digests in place and the metadata last, which commits it.
   * A kill at any moment leaves either staged files without pending metadata
   * (garbage: the next cleanup removes them) or pending metadata, which
   * recoverCommits() rolls forward. Data under a final name never lacks
   * metadata that says what it is.
   */
  async commitBackup(meta: BackupMetadata, digests: Buffer | null = null): Promise<void> {
    await this.storage.put(this.pendingMetadataKey(meta.disk, meta.id), metadataText(meta));
    await this.layoutOf(meta).commit(this, meta, digests);
  }

  /**
   * Finish commits an interrupted backup left (pending metadata whose data and
   * digests are all there, staged or renamed). One that cannot be finished is
   * left as it is, for the findings to report. Call with the disk's lock held.
   */
  async recoverCommits(disk: string): Promise<string[]> {
    const finished: string[] = [];
    for (const name of await this.storage.list(this.diskKey(disk))) {
      const id = keys.pendingId(name);
      if (id === null) continue;
      const meta = await this.readPending(disk, id);
      if (meta && (await this.layoutOf(meta).hasCommitFiles(this, meta))) {
        await this.layoutOf(meta).finishCommit(this, meta);
        finished.push(id);
      }
    }
    return finished;
  }

  /** Can the next writer finish this pending commit (its metadata readable, its data and digests there)? */
  async canFinishCommit(disk: string, id: string): Promise<boolean> {
    const meta = await this.readPending(disk, id);
    return meta !== null && (await this.layoutOf(meta).hasCommitFiles(this, meta));
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

  /**
   * Delete a backup for good: its metadata is first renamed to a deletion
   * intent (`.<id>.deleting.tmp`: the backup stops being listed, and what is
   * left of it is known to be garbage), then its data and digests go, the
   * intent last. A killed deletion is finished by the next cleanLeftovers().
   */
  async deleteBackup(meta: BackupMetadata): Promise<void> {
    const [metadata, intent] = [this.metadataKey(meta.disk, meta.id), keys.deletingKey(meta.disk, meta.id)];
    // Without renames (an object store) the intent is a copy written before the metadata goes.
    await this.storage.batch(this.storage.rename ? [{ rename: metadata, to: intent }] : [{ put: intent, data: metadataText(meta) }, { delete: metadata }]);
    await this.layoutOf(meta).deleteFiles(this, meta.disk, meta.id);
  }

  /**
   * Refuse to write plaintext into a repository whose other backups are
   * sealed: its vhdvault.json lost its `encryption` field and its key files
   * are gone (with key files, open() refuses already). The first metadata
   * of up to three disks is looked at: a few reads, before a disk's first backup only.
   */
  async refuseIfSealedElsewhere(): Promise<void> {
    if (this.unlocked) return;
    for (const disk of (await this.disks()).slice(0, 3)) {
      const name = (await this.storage.list(this.diskKey(disk))).find((n) => isBackupId(n.replace(/\.json$/, '')) && n.endsWith('.json'));
      if (!name) continue;
      const k = key(this.diskKey(disk), name);
      const bytes = await this.storage.get(k, { offset: 0, length: 4 }).catch(() => Buffer.alloc(0));
      if (looksSealed(bytes)) throw new VaultError(this.storage.describe(k), `is sealed (encrypted), but ${this.storage.describe(keys.CONFIG_FILE)} says the repository is not encrypted: refusing to write plaintext beside it (was vhdvault.json replaced and its key files removed?)`);
    }
  }

  /** A disk named on the command line must exist: a misspelt name must not read as "nothing wrong". */
  /** `disk`, when it has anything (a backup, or files to report); else the one error every command gives, with a suggestion. */
  async requireDisk(disk: string): Promise<string> {
    // An empty folder is what a failed first backup leaves: no disk yet. (One holding a lock is a disk someone works on: unlock needs it.)
    const names = (await this.storage.head(this.diskKey(disk))) ? await this.storage.list(this.diskKey(disk)) : [];
    if (names.length === 0) throw await this.noSuchDisk(disk);
    return disk;
  }

  /** "has no backups of disk X", with the disk probably meant. */
  async noSuchDisk(disk: string): Promise<VaultError> {
    const withBackups: string[] = [];
    for (const d of await this.disks()) if (d !== disk && (await this.storage.list(this.diskKey(d))).some((n) => n !== 'lock')) withBackups.push(d);
    const near = nearest(disk, withBackups);
    return new VaultError(this.root, `has no backups of disk "${disk}"${near ? ` (did you mean ${near}?)` : ''}`);
  }

  async disks(): Promise<string[]> {
    return (await this.storage.list(keys.disksKey())).filter((name) => !name.startsWith('.'));
  }

  /** Committed backups of a disk, oldest first. Unreadable metadata is reported through `onProblem`. */
  async backups(disk: string, onProblem: (err: VaultError) => void = () => undefined): Promise<BackupMetadata[]> {
    const out: BackupMetadata[] = [];
    for (const name of await this.storage.list(this.diskKey(disk))) {
      const id = name.replace(/\.json$/, '');
      if (!name.endsWith('.json') || !isBackupId(id)) continue;
      const k = key(this.diskKey(disk), name);
      let bytes: Buffer;
      try {
        bytes = await this.storage.get(k);
      } catch (err) {
        if (isNotFound(err)) continue;
        if (isUnavailable(err) || !(err instanceof VaultError)) throw err;
        onProblem(err);
        continue;
      }
      // Sealed metadata in a repository said to be plain: vhdvault.json was replaced (and the key files
      // removed, or open() would have refused): a backup written now would put plaintext beside it.
      if (!this.unlocked && looksSealed(bytes)) {
        throw new VaultError(this.storage.describe(k), `is sealed (encrypted), but ${this.storage.describe(keys.CONFIG_FILE)} says the repository is not encrypted: refusing to use it (was vhdvault.json replaced and its key files removed?)`);
      }
      try {
        out.push(parseMetadata(parseJson(bytes, this.storage.describe(k)), this.storage.describe(k), disk, id));
      } catch (err) {
        // Deleted since the listing: not a backup any more.
        if (isNotFound(err)) continue;
        // A store that failed to answer says nothing about the backup: taking it for unreadable
        // metadata would let a backup build on an older parent, or a list leave it out.
        if (isUnavailable(err) || !(err instanceof VaultError)) throw err;
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
      // Still a not-found: callers tell a backup that is not there from one whose metadata cannot be read.
      if (isNotFound(err)) throw new NotFoundError(this.diskDir(disk), `has no backup ${id}`);
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
  async cleanLeftovers(disk: string): Promise<string[]> {
    const layout = this.layout;
    // Deletions a killed prune began: the metadata (still there where the intent is a copy
    // and the kill came before its removal), then the backup's files, the intent last.
    for (const name of await this.storage.list(this.diskKey(disk))) {
      const id = keys.deletingId(name);
      if (id === null) continue;
      await this.storage.delete(this.metadataKey(disk, id));
      await layout.deleteFiles(this, disk, id);
    }
    // A pending commit that provably never finished (objects layout: its block map never arrived, §4.15).
    for (const name of await this.storage.list(this.diskKey(disk))) {
      const id = keys.pendingId(name);
      const meta = id === null ? null : await this.readPending(disk, id);
      if (meta && (await this.layoutOf(meta).abandoned(this, meta))) await this.storage.delete(key(this.diskKey(disk), name));
    }
    const names = await this.storage.list(this.diskKey(disk));
    const claimed = new Set<string>();
    for (const id of names.map(keys.pendingId)) if (id !== null) claimed.add(keys.stagedName(layout.dataName(id))).add(keys.stagedName(`${id}.digests`));
    const removed: string[] = [];
    for (const name of names) {
      if (!isTemporaryName(name) || keys.pendingId(name) !== null || layout.keepsTemporary(name) || claimed.has(name)) continue;
      // Another live process's work in progress (a lock being acquired right now, say) is not ours to remove.
      if (inUseByAnother(name)) continue;
      if ((await layout.merge.leftover(this, disk, name, names)) === false) continue;
      await this.storage.delete(key(this.diskKey(disk), name));
      removed.push(name);
    }
    return removed;
  }
}
