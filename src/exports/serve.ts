/**
 * `vhdvault serve`: a disk's backups as NBD exports, read straight from the
 * repository. The chosen backup (the latest unless named) is the default
 * export, under the disk's name (or `--name`); every backup is also offered as
 * `<disk>@<id>`, read-only. The server runs as a reader of the disk, so no
 * prune merges or deletes what it serves; with `writable`, the default export
 * takes writes into an overlay outside the repository (overlay.ts).
 */
import { lstat, stat } from 'node:fs/promises';
import { dirname } from 'node:path';
import { NbdServer, type Listen } from '../nbd/NbdServer.js';
import type { ExportCatalog, NbdExport } from '../nbd/export.js';
import { VaultError } from '../util/errors.js';
import { BackupExport, BlockCache } from './backupExport.js';
import { readingDisk } from '../store/merge.js';
import { isBackupId } from '../store/names.js';
import { defaultOverlayDir, Overlay, OverlayExport } from './overlay.js';
import type { BackupMetadata, Repository } from '../store/repository.js';
import { pickBackup } from '../store/restore.js';

export interface ServeOptions {
  backup?: string;
  listen: Listen;
  /** The default export's name (default: the disk's name). */
  name?: string;
  writable?: boolean;
  /** The overlay folder for `writable` (default: `<disk>-<id>.overlay` in the current folder). */
  overlay?: string;
  /** Clients served at once (an export chosen); more are refused at GO, each with a line in the log. */
  maxConnections?: number;
  /** Told once the server listens. */
  onReady: (ready: ServeReady) => void;
  /** Failures told in full (a client's protocol error, a block that fails its digest). */
  log: (message: string) => void;
  /** Resolves when the server should stop (a signal). */
  until: Promise<unknown>;
  onWait?: (message: string) => void;
}

export interface ServeReady {
  /** The default export's URI. */
  uri: string;
  exportName: string;
  backup: string;
  writable: boolean;
  overlay: string | null;
  exports: string[];
}

class BackupCatalog implements ExportCatalog {
  private readonly opened = new Map<string, Promise<BackupExport>>();
  private readonly cache = new BlockCache();
  private defaultExport: Promise<NbdExport> | null = null;

  constructor(
    private readonly repo: Repository,
    private readonly disk: string,
    private readonly chosen: BackupMetadata,
    readonly defaultName: string,
    private readonly overlay: Overlay | null,
  ) {}

  async list(): Promise<Array<{ name: string; description: string }>> {
    const backups = await this.repo.backups(this.disk);
    const describe = (b: BackupMetadata) => `backup ${b.id} of ${this.disk} (${b.kind}, ${b.createdAt})`;
    return [
      { name: this.defaultName, description: `${describe(this.chosen)}${this.overlay ? ', writable through an overlay' : ''}` },
      ...backups.map((b) => ({ name: `${this.disk}@${b.id}`, description: describe(b) })),
    ];
  }

  /** One BackupExport per backup, opened at the first client that asks and shared by all. */
  private backupExport(meta: BackupMetadata): Promise<BackupExport> {
    let exp = this.opened.get(meta.id);
    if (!exp) {
      exp = BackupExport.open(this.repo, meta, this.cache);
      exp.catch(() => this.opened.delete(meta.id));
      this.opened.set(meta.id, exp);
    }
    return exp;
  }

  async open(name: string): Promise<NbdExport | null> {
    if (name === '' || name === this.defaultName) {
      this.defaultExport ??= this.backupExport(this.chosen).then((base) => (this.overlay ? new OverlayExport(base, this.overlay) : base));
      return this.defaultExport.catch((err: unknown) => {
        this.defaultExport = null;
        throw err;
      });
    }
    const prefix = `${this.disk}@`;
    if (!name.startsWith(prefix) || !isBackupId(name.slice(prefix.length))) return null;
    const meta = await this.repo.backup(this.disk, name.slice(prefix.length)).catch(() => null);
    return meta ? this.backupExport(meta) : null;
  }

  async close(): Promise<void> {
    const flushing = this.defaultExport ? await this.defaultExport.catch(() => null) : null;
    await flushing?.flush?.();
    await Promise.all([...this.opened.values()].map(async (p) => (await p.catch(() => null))?.close()));
    await this.overlay?.close();
  }
}

/** Serve until `options.until` resolves, as a reader of the disk; then close every connection cleanly. */
export async function serve(repo: Repository, disk: string, options: ServeOptions): Promise<void> {
  if (options.writable && !repo.storage.capabilities.localFiles) {
    throw new VaultError(repo.root, 'serve --writable keeps writes in an overlay VHD whose parent is the backup\'s VHD file, and a backup on an object store has none: serve it read-only, or restore it to a folder first');
  }
  await readingDisk(
    repo,
    disk,
    'serve',
    async () => {
      const chosen = await pickBackup(repo, disk, options.backup);
      const exportName = options.name ?? disk;
      const overlay = options.writable ? await Overlay.open(repo, chosen, options.overlay ?? defaultOverlayDir(disk, chosen.id), { create: true, writable: true }) : null;
      const catalog = new BackupCatalog(repo, disk, chosen, exportName, overlay);
      const server = new NbdServer(catalog, { log: options.log, maxConnections: options.maxConnections });
      try {
        // The chosen backup is opened (and its chain checked) before anyone connects: a broken one fails here, not in a client.
        await catalog.open('');
        const base = await server.listen(options.listen);
        const exports = (await catalog.list()).map((e) => e.name);
        options.onReady({ uri: uriWithExport(base, exportName), exportName, backup: chosen.id, writable: overlay !== null, overlay: overlay?.dir ?? null, exports });
        await options.until;
      } catch (err) {
        if (err instanceof VaultError || !(err as NodeJS.ErrnoException)?.code) throw err;
        throw await listenError(options.listen, err as NodeJS.ErrnoException);
      } finally {
        await server.stop();
      }
    },
    options.onWait,
  );
}

/** `nbd://host:port` + `/name`, or `nbd+unix:///name?socket=…`. */
function uriWithExport(base: string, name: string): string {
  const encoded = encodeURIComponent(name).replace(/%40/g, '@');
  return base.startsWith('nbd+unix:///') ? base.replace('nbd+unix:///', `nbd+unix:///${encoded}`) : `${base}/${encoded}`;
}

/** Why the server could not listen, in a user's words. */
async function listenError(listen: Listen, err: NodeJS.ErrnoException): Promise<VaultError> {
  if (!('path' in listen)) {
    const where = `${listen.host}:${listen.port}`;
    if (err.code === 'EADDRINUSE') return new VaultError(where, 'address already in use (another server listens there)');
    if (err.code === 'EADDRNOTAVAIL' || err.code === 'ENOTFOUND') return new VaultError(where, 'no such address on this host');
    if (err.code === 'EACCES') return new VaultError(where, 'permission denied (ports below 1024 need root)');
    return new VaultError(where, err.message);
  }
  const path = listen.path;
  const parent = await stat(dirname(path)).catch(() => null);
  if (!parent?.isDirectory()) return new VaultError(path, `its folder ${dirname(path)} does not exist`);
  const existing = await lstat(path).catch(() => null);
  if (existing && !existing.isSocket()) return new VaultError(path, 'exists and is not a socket: refusing to replace it');
  if (err.code === 'EADDRINUSE') return new VaultError(path, 'a server already listens on this socket');
  if (err.code === 'EACCES') return new VaultError(path, 'permission denied');
  return new VaultError(path, err.message);
}
