import { mkdir, readdir, readFile, rename, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { type Compression, isCompression } from '../vhd/compression.js';
import { DEFAULT_BLOCK_SIZE } from '../vhd/constants.js';
import { describeFsError, UsageError, VhdError } from '../vhd/errors.js';
import { AtomicFile, fsyncDirectory, removeQuietly } from '../util/fsync.js';
import { bytesUnder, pathExists } from '../util/files.js';
import { checkBackupId, checkDiskName, isBackupId } from './names.js';
import { ensureReserve } from './reserve.js';

export type Layout = 'dir' | 'vhd';

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
}

/**
 * Metadata of a backup just written by vhdvault (whole blocks, SHA-256 digests),
 * its kind following from its parent. Its size on disk is measured here, on
 * the staged files the commit will rename into place.
 */
export async function newBackupMetadata(
  repo: Repository,
  fields: Pick<BackupMetadata, 'disk' | 'id' | 'size' | 'blockCount' | 'uuid' | 'blocksWritten' | 'bytesWritten'> & { parent: string | null },
): Promise<BackupMetadata> {
  const { layout, compression, blockSize } = repo.config;
  return {
    format: 1,
    ...fields,
    kind: fields.parent ? 'delta' : 'full',
    createdAt: new Date().toISOString(),
    blockSize,
    layout,
    compression: layout === 'dir' ? compression : 'none',
    bytesStored: await storedBytes([repo.stagedDataPath(fields.disk, fields.id), repo.stagedDigestsPath(fields.disk, fields.id)]),
    digestAlgorithm: 'sha256',
    wholeBlocks: true,
  };
}

const CONFIG_FILE = 'vhdvault.json';
const DISKS_DIR = 'disks';


export async function writeJsonAtomically(path: string, value: unknown): Promise<void> {
  const file = await AtomicFile.create(path);
  await file.commit(async () => {
    await file.handle.writeFile(`${JSON.stringify(value, null, 2)}\n`);
  });
}

/** Bytes a backup occupies: its data (file or directory) and its digests. */
export const storedBytes = bytesUnder;

async function readJson(path: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new VhdError(path, describeFsError(err));
  }
  try {
    return JSON.parse(text);
  } catch {
    throw new VhdError(path, 'is not valid JSON');
  }
}

function parseConfig(value: unknown, path: string): RepositoryConfig {
  const v = value as Partial<RepositoryConfig> | null;
  if (!v || v.format !== 'vhdvault-repository') throw new VhdError(path, 'is not a vhdvault repository file');
  if (v.version !== 1) throw new VhdError(path, `repository format version ${String(v.version)} is not supported`);
  if (v.layout !== 'dir' && v.layout !== 'vhd') throw new VhdError(path, `unknown layout ${JSON.stringify(v.layout)}`);
  if (!isCompression(v.compression)) throw new VhdError(path, `unknown compression ${JSON.stringify(v.compression)}`);
  if (v.blockSize !== DEFAULT_BLOCK_SIZE) throw new VhdError(path, `unsupported block size ${String(v.blockSize)}`);
  return v as RepositoryConfig;
}

function parseMetadata(value: unknown, path: string, disk: string, id: string): BackupMetadata {
  const m = value as Partial<BackupMetadata> | null;
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
    (m.layout === 'dir' || m.layout === 'vhd');
  if (!ok) throw new VhdError(path, 'is not valid backup metadata');
  return m as BackupMetadata;
}

/** A repository on a local (or mounted) filesystem. */
export class Repository {
  private constructor(
    readonly root: string,
    readonly config: RepositoryConfig,
  ) {}

  /** Create a repository in an empty or missing folder. */
  static async init(root: string, options: { layout: Layout; compression: Compression }): Promise<Repository> {
    if (options.layout === 'vhd' && options.compression !== 'none') {
      throw new UsageError('compression applies to the dir layout only (VHD files are stored uncompressed)');
    }
    const configPath = join(root, CONFIG_FILE);
    if (await pathExists(configPath)) throw new VhdError(root, 'is already a vhdvault repository');
    const s = await stat(root).catch(() => null);
    if (s && !s.isDirectory()) throw new VhdError(root, 'exists and is not a folder');
    if (s && (await readdir(root)).length > 0) throw new VhdError(root, 'is not empty and is not a vhdvault repository: refusing to use it');
    await mkdir(join(root, DISKS_DIR), { recursive: true });
    const config: RepositoryConfig = {
      format: 'vhdvault-repository',
      version: 1,
      layout: options.layout,
      compression: options.compression,
      blockSize: DEFAULT_BLOCK_SIZE,
      createdAt: new Date().toISOString(),
    };
    await writeJsonAtomically(configPath, config);
    const repo = new Repository(resolve(root), config);
    await ensureReserve(repo);
    return repo;
  }

  static async open(root: string): Promise<Repository> {
    const configPath = join(root, CONFIG_FILE);
    if (!(await pathExists(configPath))) throw new VhdError(root, 'is not a vhdvault repository (no vhdvault.json); create one with `vhdvault init`');
    return new Repository(resolve(root), parseConfig(await readJson(configPath), configPath));
  }

  diskDir(disk: string): string {
    return join(this.root, DISKS_DIR, checkDiskName(disk));
  }

  dataName(id: string, layout: Layout = this.config.layout): string {
    return `${checkBackupId(id)}.${layout === 'dir' ? 'vhd-dir' : 'vhd'}`;
  }

  dataPath(disk: string, id: string, layout?: Layout): string {
    return join(this.diskDir(disk), this.dataName(id, layout));
  }

  digestsPath(disk: string, id: string): string {
    return join(this.diskDir(disk), `${checkBackupId(id)}.digests`);
  }

  metadataPath(disk: string, id: string): string {
    return join(this.diskDir(disk), `${checkBackupId(id)}.json`);
  }

  /** Where a backup's data is written before its commit: a temporary name cleanup may remove. */
  stagedDataPath(disk: string, id: string, layout?: Layout): string {
    return join(this.diskDir(disk), stagedName(this.dataName(id, layout)));
  }

  stagedDigestsPath(disk: string, id: string): string {
    return join(this.diskDir(disk), stagedName(`${checkBackupId(id)}.digests`));
  }

  /** The metadata of a backup being committed: while it exists, its staged files are not garbage. */
  pendingMetadataPath(disk: string, id: string): string {
    return join(this.diskDir(disk), stagedName(`${checkBackupId(id)}.json`));
  }

  /**
   * Make a staged backup (data and digests under their staged names, durable)
   * exist: its metadata is written under the pending name, the data and digests
   * are renamed into place, and the metadata's rename commits it. A kill at any
   * moment leaves either staged files without pending metadata (garbage: the
   * next cleanup removes them) or pending metadata, which recoverCommits() rolls
   * forward. Data under a final name never lacks metadata that says what it is.
   */
  async commitBackup(meta: BackupMetadata): Promise<void> {
    await writeJsonAtomically(this.pendingMetadataPath(meta.disk, meta.id), meta);
    await this.finishCommit(meta);
  }

  private async finishCommit(meta: BackupMetadata): Promise<void> {
    const { disk, id, layout } = meta;
    await renameIfPresent(this.stagedDataPath(disk, id, layout), this.dataPath(disk, id, layout));
    await renameIfPresent(this.stagedDigestsPath(disk, id), this.digestsPath(disk, id));
    await fsyncDirectory(this.diskDir(disk));
    await rename(this.pendingMetadataPath(disk, id), this.metadataPath(disk, id));
    await fsyncDirectory(this.diskDir(disk));
  }

  /**
   * Finish commits an interrupted backup left (pending metadata whose data and
   * digests are all there, staged or renamed). One that cannot be finished is
   * left as it is, for inspect() to report. Call with the disk's lock held.
   */
  async recoverCommits(disk: string): Promise<string[]> {
    const finished: string[] = [];
    for (const name of await readdir(this.diskDir(disk)).catch(() => [] as string[])) {
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

  private async readPending(disk: string, id: string): Promise<BackupMetadata | null> {
    const path = this.pendingMetadataPath(disk, id);
    try {
      return parseMetadata(await readJson(path), path, disk, id);
    } catch (err) {
      if (err instanceof VhdError) return null;
      throw err;
    }
  }

  private async hasCommitFiles(meta: BackupMetadata): Promise<boolean> {
    const { disk, id, layout } = meta;
    const data = (await pathExists(this.stagedDataPath(disk, id, layout))) || (await pathExists(this.dataPath(disk, id, layout)));
    const digests = (await pathExists(this.stagedDigestsPath(disk, id))) || (await pathExists(this.digestsPath(disk, id)));
    return data && digests;
  }

  /** A disk named on the command line must exist: a misspelt name must not read as "nothing wrong". */
  async requireDisk(disk: string): Promise<string> {
    if (!(await pathExists(this.diskDir(disk)))) throw new VhdError(this.root, `has no disk named ${disk}`);
    return disk;
  }

  async disks(): Promise<string[]> {
    const entries = await readdir(join(this.root, DISKS_DIR), { withFileTypes: true }).catch(() => []);
    return entries
      .filter((e) => e.isDirectory())
      .map((e) => e.name)
      .sort();
  }

  /** Committed backups of a disk, oldest first. Unreadable metadata is reported through `onProblem`. */
  async backups(disk: string, onProblem: (err: VhdError) => void = () => undefined): Promise<BackupMetadata[]> {
    const dir = this.diskDir(disk);
    const names = await readdir(dir).catch(() => [] as string[]);
    const out: BackupMetadata[] = [];
    for (const name of names.sort()) {
      const id = name.replace(/\.json$/, '');
      if (!name.endsWith('.json') || !isBackupId(id)) continue;
      const path = join(dir, name);
      try {
        out.push(parseMetadata(await readJson(path), path, disk, id));
      } catch (err) {
        if (!(err instanceof VhdError)) throw err;
        onProblem(err);
      }
    }
    return out;
  }

  async backup(disk: string, id: string): Promise<BackupMetadata> {
    const path = this.metadataPath(disk, id);
    if (!(await pathExists(path))) throw new VhdError(this.diskDir(disk), `has no backup ${id}`);
    return parseMetadata(await readJson(path), path, disk, id);
  }

  async latest(disk: string): Promise<BackupMetadata | undefined> {
    return (await this.backups(disk)).at(-1);
  }

  /**
   * Remove what interrupted runs left, and nothing else: names that are ours
   * and temporary (`.<name>.tmp`), unless pending metadata still claims them.
   * Data or digests without metadata are never removed here: inspect() reports
   * them. Call with the disk's lock held, after recoverCommits().
   */
  async cleanLeftovers(disk: string): Promise<string[]> {
    const dir = this.diskDir(disk);
    const names = await readdir(dir).catch(() => [] as string[]);
    const claimed = new Set(names.map(pendingId).filter((id): id is string => id !== null));
    const removed: string[] = [];
    for (const name of names) {
      if (!isTemporaryName(name) || pendingId(name) !== null) continue;
      // A lock being acquired right now stages its file under `.lock.*.tmp`.
      if (name.startsWith('.lock.')) continue;
      const stagedOf = /^\.(\d{8}T\d{9}Z-[0-9a-f]{6})\.(vhd-dir|vhd|digests)\.tmp$/.exec(name)?.[1];
      if (stagedOf !== undefined && claimed.has(stagedOf)) continue;
      await removeQuietly(join(dir, name));
      removed.push(name);
    }
    return removed;
  }
}

/** `.<name>.tmp`: a name only vhdvault's own temporary files carry. */
export function isTemporaryName(name: string): boolean {
  return name.startsWith('.') && name.endsWith('.tmp');
}

const stagedName = (name: string) => `.${name}.tmp`;

/** The backup id of a pending metadata name (`.<id>.json.tmp`), else null. */
export function pendingId(name: string): string | null {
  const m = /^\.(.+)\.json\.tmp$/.exec(name);
  return m && isBackupId(m[1]!) ? m[1]! : null;
}

async function renameIfPresent(from: string, to: string): Promise<void> {
  await rename(from, to).catch((err: NodeJS.ErrnoException) => {
    if (err.code !== 'ENOENT') throw err;
  });
}
