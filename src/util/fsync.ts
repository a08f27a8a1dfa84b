import { execFile } from 'node:child_process';
import { type FileHandle, open, rename, rm, stat } from 'node:fs/promises';
import { describeFsError, VaultError } from './errors.js';
import { promisify } from 'node:util';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';

/** A sibling temporary name: same directory, so the final rename is atomic. */
export function temporaryPath(target: string): string {
  return join(dirname(target), `.${basename(target)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
}

/** fsync a directory so a rename inside it survives a crash. */
export async function fsyncDirectory(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** Remove what a failed write staged; a removal that fails is an error naming what is left behind. */
export async function removeStaged(path: string): Promise<void> {
  await rm(path, { force: true, recursive: true }).catch((err: unknown) => {
    throw new VaultError(path, `is left behind: it cannot be removed (${describeFsError(err)}); remove it by hand`);
  });
}

/**
 * Run `cleanUp` (an abort) after `err`; resolves to what to throw: `err`, or,
 * when the clean-up fails too, `err` saying also what is left behind.
 */
export async function cleanUpAfter(err: unknown, cleanUp: () => Promise<void>): Promise<unknown> {
  try {
    await cleanUp();
    return err;
  } catch (failure) {
    return alsoSaying(err, `and ${(failure as Error).message}`);
  }
}

/** `err` with `more` after its message, its type and code kept (an fs error becomes a VaultError naming its path). */
function alsoSaying(err: unknown, more: string): unknown {
  const fsError = err as NodeJS.ErrnoException;
  if (fsError?.code && fsError.path && !(err instanceof VaultError)) {
    return Object.assign(new VaultError(fsError.path, `${describeFsError(err)}; ${more}`), { code: fsError.code });
  }
  if (!(err instanceof Error)) return new Error(`${String(err)}; ${more}`);
  err.message = `${err.message}; ${more}`;
  return err;
}

/**
 * A file written under a temporary sibling name and given its real name only by
 * commit() (fsync, rename, fsync of the directory). Until then, and after
 * abort(), the target is untouched.
 */
/** Written bytes after which AtomicFile starts a background flush. */
const FLUSH_EVERY = 16 * 1024 * 1024;

export class AtomicFile {
  private unflushed = 0;
  private flushing: Promise<void> | null = null;
  private flushError: unknown = null;

  private constructor(
    readonly target: string,
    readonly temp: string,
    readonly handle: FileHandle,
  ) {}

  /** Errors name `target`, never the temporary name the user does not know. */
  static async create(target: string): Promise<AtomicFile> {
    const existing = await stat(target).catch(() => null);
    if (existing?.isDirectory()) throw new VaultError(target, 'is a directory: cannot write a file there');
    const temp = temporaryPath(target);
    try {
      return new AtomicFile(target, temp, await open(temp, 'wx'));
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw new VaultError(target, code === 'ENOENT' || code === 'ENOTDIR' ? 'cannot be written: its folder does not exist' : `cannot be written: ${describeFsError(err)}`);
    }
  }

  /**
   * Tell the file that `bytes` more were written: every 16 MiB a datasync starts
   * in the background (one at a time), so writeback overlaps the writing and
   * commit's final fsync has little left. Its error is kept and thrown by commit
   * (Linux reports a writeback error only once).
   */
  wrote(bytes: number): void {
    this.unflushed += bytes;
    if (this.unflushed < FLUSH_EVERY || this.flushing) return;
    this.unflushed = 0;
    this.flushing = this.handle
      .datasync()
      .catch((err: unknown) => {
        this.flushError ??= err;
      })
      .finally(() => {
        this.flushing = null;
      });
  }

  /** Run `writeRest` (final writes), then make the file durable under its real name; abort on any failure. */
  async commit(writeRest: () => Promise<void> = async () => undefined): Promise<void> {
    try {
      await writeRest();
      await this.flushing;
      if (this.flushError) throw this.flushError;
      await this.handle.sync();
      await this.handle.close();
      await rename(this.temp, this.target).catch((err: unknown) => {
        throw new VaultError(this.target, `cannot be replaced: ${describeFsError(err)}`);
      });
      await fsyncDirectory(dirname(this.target));
    } catch (err) {
      throw await cleanUpAfter(err, () => this.abort());
    }
  }

  async abort(): Promise<void> {
    await this.flushing;
    await this.handle.close().catch(() => undefined);
    await removeStaged(this.temp);
  }
}

/**
 * Flush every dirty page of the filesystem holding `path` (syncfs(2), through
 * coreutils `sync -f`): one flush for thousands of block files, instead of an
 * fsync each. Falls back to a global sync where `-f` is not supported.
 */
export async function syncFilesystem(path: string): Promise<void> {
  const run = promisify(execFile);
  try {
    await run('sync', ['-f', path]);
  } catch {
    await run('sync', []);
  }
}
