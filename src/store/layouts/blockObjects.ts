import { createHash, randomBytes } from 'node:crypto';
import { lstat, mkdir, readdir, readFile, rename, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { decompress } from '../../vhd/compression.js';
import { VaultError } from '../../util/errors.js';
import { isNotFound, key } from '../../storage/Storage.js';
import { checkDigestsBinding, DIGEST_SIZE, digestsSha256 } from '../digests.js';
import { blocksKey, digestsKey, diskKey, inDisk } from '../keys.js';
import { SharedObjectError } from '../finding.js';
import type { BackupMetadata } from '../metadata.js';
import { checkBackupId, checkDiskName, isBackupId } from '../names.js';
import type { LayoutContext } from './Layout.js';

/**
 * The objects layout (docs/design/04-repository.md §4.15): each block a backup stores is an
 * immutable object `disks/<disk>/blocks/<2 hex>/<64 hex>` named by the SHA-256
 * of its 2 MiB of content, and each backup's digests file is its block map (the
 * whole disk at that backup). A merge therefore rewrites metadata only; block
 * objects are deleted when no map of the disk names them.
 */

const HEX_NAME = /^[0-9a-f]{64}$/;

export function blockObjectKey(disk: string, digest: Uint8Array): string {
  const hex = Buffer.from(digest).toString('hex');
  return key(blocksKey(disk), hex.slice(0, 2), hex);
}

/** A block object's content (decompressed), checked for length; its digest is the caller's to check. */
export async function readBlockObject(repo: LayoutContext, meta: BackupMetadata, digest: Uint8Array): Promise<Buffer> {
  const k = blockObjectKey(meta.disk, digest);
  let stored: Buffer;
  try {
    stored = await repo.storage.get(k);
  } catch (err) {
    if (isNotFound(err)) throw new SharedObjectError(repo.storage.describe(k), 'block object is missing', meta.id);
    throw err;
  }
  const data = await decompress(meta.compression, stored, meta.blockSize).catch((err: unknown) => {
    throw new VaultError(repo.storage.describe(k), `cannot decompress block object (${meta.compression}): ${(err as Error).message}`);
  });
  if (data.length !== meta.blockSize) throw new VaultError(repo.storage.describe(k), `block object holds ${data.length} bytes, ${meta.blockSize} expected`);
  return data;
}

/** A backup's block map in memory: blockCount × 32 bytes (16 MiB for a 1 TiB disk). */
export class BlockMap {
  constructor(
    readonly bytes: Buffer,
    readonly blockSize: number,
    /** The digest of an all-zero block, in the repository's digest. */
    private readonly zero: Buffer,
  ) {}

  get blockCount(): number {
    return this.bytes.length / DIGEST_SIZE;
  }

  digest(block: number): Buffer {
    return this.bytes.subarray(block * DIGEST_SIZE, (block + 1) * DIGEST_SIZE);
  }

  /** An all-zero block has no object: it reads as zeros. */
  hasObject(block: number): boolean {
    return !this.digest(block).equals(this.zero);
  }

  /** The same interface as DigestReader, for code that reads either. */
  async get(block: number): Promise<Buffer> {
    if (block < 0 || block >= this.blockCount) throw new RangeError(`block ${block} outside ${this.blockCount} digests`);
    return Buffer.from(this.digest(block));
  }

  async close(): Promise<void> {}
}

/**
 * Committed maps never change (a merge rewrites metadata, never a map), so an
 * object store's maps are kept in a local cache: a restore or delta reads each
 * once. The cache is per repository (URI and creation time) and disk.
 */
function cacheFolder(repo: LayoutContext, disk: string): string | null {
  if (repo.storage.capabilities.localFiles) return null;
  const base = process.env.VHDVAULT_CACHE_DIR ?? join(process.env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'vhdvault');
  const repoId = createHash('sha256').update(`${repo.root}\0${repo.config.createdAt}`).digest('hex').slice(0, 16);
  return join(base, 'maps', repoId, checkDiskName(disk));
}

const MAP_NAME = /^(.+)\.digests$/;

function cachePath(repo: LayoutContext, disk: string, id: string): string | null {
  const folder = cacheFolder(repo, disk);
  return folder && join(folder, `${checkBackupId(id)}.digests`);
}

/** Disk cache folders trimmed by this process: once each is enough. */
const trimmed = new Set<string>();

/**
 * Remove the disk's cached maps whose backup the store no longer holds (pruned,
 * merged away, or deleted from another machine): one listing of the disk's
 * folder, none when nothing is cached. Only `<id>.digests` entries of the
 * disk's cache folder go, and only copies: a map still needed is read from the
 * store again. A cache that cannot be read or trimmed is left as it is.
 */
export async function trimMapCache(repo: LayoutContext, disk: string): Promise<void> {
  const folder = cacheFolder(repo, disk);
  if (!folder) return;
  trimmed.add(folder);
  const cached = (await readdir(folder).catch(() => [])).filter((name) => isBackupId(MAP_NAME.exec(name)?.[1] ?? ''));
  if (cached.length === 0) return;
  const stored = new Set(await repo.storage.list(diskKey(disk)).catch(() => cached));
  // unlink: a link goes, never what it points to; a folder at a map's name stays.
  for (const name of cached) if (!stored.has(name)) await unlink(join(folder, name)).catch(() => undefined);
}

/**
 * A backup's block map, checked for size. `fresh` skips the local cache (verify
 * checks the store itself).
 */
export async function loadBlockMap(repo: LayoutContext, meta: BackupMetadata, options: { fresh?: boolean } = {}): Promise<BlockMap> {
  const expected = meta.blockCount * DIGEST_SIZE;
  const cached = options.fresh ? null : cachePath(repo, meta.disk, meta.id);
  const k = digestsKey(meta.disk, meta.id);
  // A cached copy counts only when it is the map the backup's metadata (read from the store) records,
  // and while the store still holds it (one HEAD, not the download): a backup whose map is gone is
  // damaged, whatever this machine remembers. Backups that record no digest are read from the store.
  if (cached && !trimmed.has(dirname(cached))) await trimMapCache(repo, meta.disk);
  if (cached && meta.digestsSha256 !== undefined) {
    const bytes = await readCached(cached, expected);
    if (bytes && digestsSha256(bytes) === meta.digestsSha256 && (await repo.storage.head(k))?.size === expected) return new BlockMap(bytes, meta.blockSize, repo.digester.zero(meta.blockSize));
  }
  let bytes: Buffer;
  try {
    bytes = await repo.storage.get(k);
  } catch (err) {
    if (isNotFound(err)) throw new VaultError(repo.storage.describe(k), `block map of backup ${meta.id} is missing`);
    throw err;
  }
  if (bytes.length !== expected) throw new VaultError(repo.storage.describe(k), `block map has ${bytes.length} bytes, expected ${expected} (${meta.blockCount} blocks)`);
  checkDigestsBinding(bytes, meta, repo.storage.describe(k));
  const path = cachePath(repo, meta.disk, meta.id);
  if (path) await writeCached(path, bytes);
  return new BlockMap(bytes, meta.blockSize, repo.digester.zero(meta.blockSize));
}

/** A cached map, if a file of the map's size is there: anything else (a fifo, a huge file) is not even read. */
async function readCached(path: string, expected: number): Promise<Buffer | null> {
  const info = await stat(path).catch(() => null);
  if (!info?.isFile() || info.size !== expected) return null;
  return readFile(path).catch(() => null);
}

/**
 * Put a map read from the store in the cache, in place of whatever entry failed
 * its check. A cache is a convenience: one that cannot be written is skipped,
 * and leaves no temporary file behind.
 */
async function writeCached(path: string, bytes: Buffer): Promise<void> {
  const temp = `${path}.${process.pid}-${randomBytes(4).toString('hex')}.tmp`;
  try {
    await mkdir(dirname(path), { recursive: true });
    await writeFile(temp, bytes);
    // A rename replaces a file or a link, not a folder: a folder at the entry's name would stay forever.
    if ((await lstat(path).catch(() => null))?.isDirectory()) await rm(path, { recursive: true, force: true });
    await rename(temp, path);
  } catch {
    await rm(temp, { force: true }).catch(() => undefined);
  }
}

export interface GarbageReport {
  /** Block objects deleted. */
  objects: number;
  /** Whether every object of the disk was listed (after an interrupted backup or prune) rather than only the candidates checked. */
  swept: boolean;
}

/**
 * `.<name>.sweep.tmp` in a disk's folder: "block objects may have been left that
 * no map names". A backup writes one before its first upload and deletes it once
 * committed; a prune writes one before it deletes backups and deletes it once it
 * has collected their objects. One left behind (a kill, a failure) makes the next
 * collection list every object of the disk. Cleanup never removes these.
 */
export const SWEEP_MARKER = /^\.(.+)\.sweep\.tmp$/;

export function sweepMarkerKey(disk: string, name: string): string {
  return inDisk(disk, `.${name}.sweep.tmp`);
}

/** The digests of the objects these backups' maps name: what deleting the backups may free. */
export async function objectsNamedBy(repo: LayoutContext, backups: BackupMetadata[]): Promise<Set<string>> {
  const named = new Set<string>();
  for (const b of backups) {
    const map = await loadBlockMap(repo, b);
    for (let i = 0; i < map.blockCount; i++) if (map.hasObject(i)) named.add(map.digest(i).toString('hex'));
  }
  return named;
}

/**
 * Delete the disk's block objects that no block map names. Every map in the
 * disk's folder counts — committed, pending, or orphaned (a lost metadata
 * file: its blocks are what a person could still rescue) — so only provable
 * garbage goes. Normally only `candidates` are checked (the objects of the
 * backups just deleted: no listing, whatever the disk's size); if a sweep
 * marker other than `ownMarker` is there, every object under `blocks/` is
 * listed and judged, and those markers are removed after. A map that cannot be
 * read stops the collection. Call holding the disk's lock (no backup adds
 * objects meanwhile); readers only read objects a listed map names.
 */
export async function collectGarbage(repo: LayoutContext, disk: string, candidates: Iterable<string> = [], ownMarker?: string): Promise<GarbageReport> {
  const { storage } = repo;
  const names = await storage.list(diskKey(disk));
  const markers = names.filter((n) => SWEEP_MARKER.test(n) && n !== (ownMarker && `.${ownMarker}.sweep.tmp`));
  const referenced = new Set<string>();
  for (const name of names) {
    const id = MAP_NAME.exec(name)?.[1];
    if (id === undefined || !isBackupId(id)) continue;
    // From the store, never the cache: what is deleted must be provably unnamed by what is stored.
    const bytes = await storage.get(key(diskKey(disk), name));
    if (bytes.length % DIGEST_SIZE !== 0) throw new VaultError(storage.describe(key(diskKey(disk), name)), `block map has ${bytes.length} bytes, not a whole number of digests: no block object is deleted`);
    for (let at = 0; at < bytes.length; at += DIGEST_SIZE) referenced.add(bytes.toString('hex', at, at + DIGEST_SIZE));
  }
  const garbage: string[] = [];
  if (markers.length === 0) {
    for (const hex of candidates) if (HEX_NAME.test(hex) && !referenced.has(hex)) garbage.push(blockObjectKey(disk, Buffer.from(hex, 'hex')));
  } else {
    for await (const object of storage.listAll(blocksKey(disk))) {
      const parts = object.key.split('/');
      const name = parts.at(-1)!;
      // Only names this layout makes: anything else in the folder is not ours to judge.
      if (HEX_NAME.test(name) && parts.at(-2) === name.slice(0, 2) && !referenced.has(name)) garbage.push(object.key);
    }
  }
  if (garbage.length > 0) await storage.deleteMany(garbage);
  if (markers.length > 0) await storage.deleteMany(markers.map((m) => key(diskKey(disk), m)));
  return { objects: garbage.length, swept: markers.length > 0 };
}
