import { link, mkdir, open, readdir, rename, rm, stat, unlink } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import pLimit from 'p-limit';
import { describeFsError, VaultError } from '../util/errors.js';
import { fsyncDirectory, syncFilesystem, temporaryPath } from '../util/fsync.js';
import { readFileRange } from '../util/smallReads.js';
import { type BatchOp, type ListedObject, type LocalDescriptor, NotFoundError, StorageError, type ObjectInfo, type PutData, type DeleteOptions, type Storage, type StorageCapabilities } from './Storage.js';

/**
 * A repository in a local (or mounted) folder: a key is a path below the root.
 * put = temporary sibling, fsync, rename (or hard link for ifAbsent, which
 * fails if the name exists), fsync of the folder: restic's local Save.
 */
export class LocalStorage implements Storage {
  readonly capabilities: StorageCapabilities = { rename: true, localFiles: true, rangedReads: true };
  readonly descriptor: LocalDescriptor;

  constructor(root: string) {
    this.descriptor = { kind: 'local', root: resolve(root) };
  }

  get root(): string {
    return this.descriptor.root;
  }

  localPath(key: string): string {
    return key === '' ? this.root : join(this.root, key);
  }

  describe(key: string): string {
    return this.localPath(key);
  }

  async get(key: string, range?: { offset: number; length: number }): Promise<Buffer> {
    const path = this.localPath(key);
    if (range) {
      // Small ranges (a served 4 KiB read of a block object) are read inline while the page cache answers.
      const buf = Buffer.alloc(range.length);
      const n = await readFileRange(path, buf, range.offset).catch((err: unknown) => {
        throw this.failure(key, err);
      });
      return buf.subarray(0, n);
    }
    let fh;
    try {
      fh = await open(path, 'r');
    } catch (err) {
      throw this.failure(key, err);
    }
    try {
      return await fh.readFile();
    } catch (err) {
      throw this.failure(key, err);
    } finally {
      await fh.close();
    }
  }

  async head(key: string): Promise<ObjectInfo | null> {
    const s = await stat(this.localPath(key)).catch(() => null);
    return s && { size: s.size, mtimeMs: s.mtimeMs, prefix: s.isDirectory() };
  }

  async list(prefix: string): Promise<string[]> {
    return (await readdir(this.localPath(prefix)).catch(() => [] as string[])).sort();
  }

  async put(key: string, data: PutData, options: { ifAbsent?: boolean } = {}): Promise<boolean> {
    const path = this.localPath(key);
    await mkdir(dirname(path), { recursive: true }).catch((err: unknown) => {
      throw this.failure(key, err);
    });
    const temp = temporaryPath(path);
    try {
      const fh = await open(temp, 'wx');
      try {
        if (typeof data === 'string' || Buffer.isBuffer(data)) await fh.writeFile(data);
        else await fh.writev([...data]);
        await fh.sync();
      } finally {
        await fh.close();
      }
      if (options.ifAbsent) {
        try {
          await link(temp, path);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
          throw err;
        }
      } else {
        await rename(temp, path);
      }
      await fsyncDirectory(dirname(path));
      return true;
    } catch (err) {
      throw this.failure(key, err);
    } finally {
      await unlink(temp).catch(() => undefined);
    }
  }

  async create(key: string, parts: Uint8Array[]): Promise<void> {
    const path = this.localPath(key);
    const fh = await open(path, 'wx').catch((err: unknown) => {
      throw this.failure(key, err);
    });
    try {
      await fh.writev(parts);
    } catch (err) {
      throw this.failure(key, err);
    } finally {
      await fh.close();
    }
  }

  async sync(prefix: string): Promise<void> {
    // One flush of the filesystem: cheaper than an fsync per block file, and it covers the folders too.
    await syncFilesystem(this.localPath(prefix));
  }

  async delete(key: string, options: DeleteOptions = {}): Promise<void> {
    const path = this.localPath(key);
    await rm(path, { recursive: true, force: true }).catch((err: unknown) => {
      throw this.failure(key, err);
    });
    // Garbage need not stay gone: a folder fsync after freeing data also waits for the filesystem to discard it.
    if (options.durable !== false) await fsyncDirectory(dirname(path)).catch(() => undefined);
  }

  async deleteMany(keys: string[]): Promise<void> {
    const limit = pLimit(16);
    const folders = new Set<string>();
    await Promise.all(
      keys.map((k) =>
        limit(async () => {
          const path = this.localPath(k);
          try {
            await unlink(path);
            folders.add(dirname(path));
          } catch (err) {
            if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw this.failure(k, err);
          }
        }),
      ),
    );
    // As in moveAll: the unlinks are durable once their folders are.
    for (const f of folders) await fsyncDirectory(f);
  }

  async *listAll(prefix: string): AsyncIterable<ListedObject> {
    // Depth first, one folder's entries in memory at a time.
    const folders = [prefix];
    while (folders.length > 0) {
      const folder = folders.pop()!;
      const entries = await readdir(this.localPath(folder), { withFileTypes: true }).catch((err: unknown) => {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'ENOENT' || code === 'ENOTDIR') return [];
        throw this.failure(folder, err);
      });
      for (const e of entries) {
        const k = folder === '' ? e.name : `${folder}/${e.name}`;
        if (e.isDirectory()) folders.push(k);
        else if (e.isFile()) {
          // Gone since the readdir (a concurrent delete): not listed.
          const s = await stat(this.localPath(k)).catch(() => null);
          if (s) yield { key: k, size: s.size, mtimeMs: s.mtimeMs };
        }
      }
    }
  }

  async rename(from: string, to: string): Promise<void> {
    await this.move(from, to);
    await fsyncDirectory(dirname(this.localPath(to)));
    if (dirname(from) !== dirname(to)) await fsyncDirectory(dirname(this.localPath(from)));
  }

  async moveAll(pairs: Array<[string, string]>, options: { ignoreMissing?: boolean; durable?: boolean } = {}): Promise<void> {
    const limit = pLimit(16);
    const folders = new Set<string>();
    await Promise.all(
      pairs.map(([from, to]) =>
        limit(async () => {
          const moved = await this.move(from, to).then(
            () => true,
            (err: unknown) => {
              if (options.ignoreMissing && err instanceof NotFoundError) return false;
              throw err;
            },
          );
          if (moved) folders.add(dirname(this.localPath(from))).add(dirname(this.localPath(to)));
        }),
      ),
    );
    // Renames are durable once their folders are: one fsync per folder, not per file.
    if (options.durable !== false) for (const f of folders) await fsyncDirectory(f);
  }

  /** rename(2); the target's folder is made only when missing (the rename says so), sparing a syscall per block. */
  private async move(from: string, to: string): Promise<void> {
    const source = this.localPath(from);
    const target = this.localPath(to);
    try {
      await rename(source, target);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || (await this.head(from)) === null) throw this.failure(from, err);
      await mkdir(dirname(target), { recursive: true });
      await rename(source, target).catch((e: unknown) => {
        throw this.failure(from, e);
      });
    }
  }

  async batch(ops: BatchOp[]): Promise<void> {
    // Each operation is durable before the next starts, so a crash leaves a first part done.
    for (const op of ops) {
      if ('put' in op) await this.put(op.put, op.data);
      else if ('delete' in op) await this.delete(op.delete);
      else await this.rename(op.rename, op.to);
    }
  }

  private failure(key: string, err: unknown): VaultError {
    if (err instanceof VaultError) return err;
    const code = (err as NodeJS.ErrnoException).code;
    const path = this.localPath(key);
    if (code === 'ENOENT') return new NotFoundError(path, 'no such file or directory', code);
    return new StorageError(path, describeFsError(err), code);
  }
}
