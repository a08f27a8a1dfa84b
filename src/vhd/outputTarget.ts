import { constants, type Stats } from 'node:fs';
import { type FileHandle, lstat, open, readlink, realpath, stat } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, relative, resolve, sep } from 'node:path';
import { describeFsError, UsageError, VaultError } from '../util/errors.js';
import type { SynthesizedImage } from './synthesize.js';
import { blockDeviceSize } from '../util/device.js';
import { AtomicFile } from '../util/fsync.js';
import type { OnProgress } from '../util/progress.js';

/**
 * Where a disk image is written, decided as `qemu-img convert` and `dd` do:
 * - `file`: a regular file or a new name, replaced atomically (AtomicFile). A
 *   symlink is followed: its final target is replaced, the link stays a link.
 * - `device`: an existing block or character device (an LVM volume, a loop
 *   device, /dev/null), written in place, raw bytes only.
 * - `stream`: `-` (standard output) or a FIFO: the bytes in order.
 * `name` is what the user typed, for messages.
 */
export type OutputTarget =
  | { kind: 'file'; name: string; path: string }
  | { kind: 'device'; name: string; path: string; device: 'block' | 'character' }
  | { kind: 'stream'; name: string; path: string | null };

export const STDOUT_NAME = '-';

/** A symlink's final target, followed link by link (a dangling one names the file to create); any other path as is. */
async function linkTarget(path: string): Promise<string> {
  for (let hops = 0; hops < 40; hops++) {
    const s = await lstat(path).catch(() => null);
    if (!s?.isSymbolicLink()) return path;
    path = resolve(dirname(path), await readlink(path));
  }
  throw new VaultError(path, 'too many levels of symbolic links');
}

export async function outputTarget(out: string): Promise<OutputTarget> {
  if (out === STDOUT_NAME) return { kind: 'stream', name: 'standard output', path: null };
  let s: Stats | null;
  try {
    s = await stat(out);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // A new name (or a dangling link): the writer reports a missing folder.
    if (code !== 'ENOENT' && code !== 'ENOTDIR') throw new VaultError(out, describeFsError(err));
    s = null;
  }
  if (s?.isBlockDevice() || s?.isCharacterDevice()) return { kind: 'device', name: out, path: out, device: s.isBlockDevice() ? 'block' : 'character' };
  if (s?.isFIFO()) return { kind: 'stream', name: out, path: out };
  if (s?.isSocket()) throw new VaultError(out, 'is a socket: a disk image cannot be written there');
  // Regular files and folders alike: the writer decides (a file output must not be a folder, a directory output must be new).
  return { kind: 'file', name: out, path: await linkTarget(out) };
}

/** With no --format: a device or stream takes the disk's raw bytes; elsewhere the name decides (undefined). */
export function implicitFormat(target: OutputTarget): 'raw' | undefined {
  return target.kind === 'file' ? undefined : 'raw';
}

/** A device holds raw bytes only; a stream cannot hold a directory. */
export function checkFormatFits(target: OutputTarget, format: string): void {
  if (target.kind === 'device' && format !== 'raw') {
    throw new UsageError(`${target.name} is a ${target.device} device: only the raw format can be written to a device`);
  }
  if (target.kind === 'stream' && format === 'dir') throw new UsageError(`a VHD directory cannot be written to ${target.name}`);
}

/** A path an output must neither be nor lie inside, and what it is, for the message. */
export interface ProtectedPath {
  path: string;
  what: string;
}

/** Where the output really lands: symlinks and `..` resolved, a new name by its folder's real path. Null for standard output. */
async function landing(target: OutputTarget): Promise<string | null> {
  if (target.path === null) return null;
  const path = target.path;
  try {
    return await realpath(path);
  } catch {
    const folder = await realpath(dirname(path)).catch(() => resolve(dirname(path)));
    return join(folder, basename(path));
  }
}

/**
 * Refuse, before anything is written, an output that is or lies inside a
 * protected path: the repository a restore reads, the input of a conversion
 * and its parents (inside: a VHD directory's own files).
 */
export async function refuseProtected(target: OutputTarget, protectedPaths: ProtectedPath[]): Promise<void> {
  const at = await landing(target);
  if (at === null) return;
  for (const p of protectedPaths) {
    const real = await realpath(p.path).catch(() => resolve(p.path));
    const rel = relative(real, at);
    if (rel === '') throw new VaultError(target.name, `is ${p.what}: refusing to write over it`);
    if (rel !== '..' && !rel.startsWith(`..${sep}`) && !isAbsolute(rel)) throw new VaultError(target.name, `is inside ${p.what}: refusing to write there`);
  }
}

/**
 * Bytes written where they go, never replaced atomically: a device in place,
 * a stream in order. A failure leaves what was already written (as dd does).
 */
export interface ByteSink {
  write(chunk: Buffer, position: number): Promise<void>;
  /** Make the bytes durable where the target has storage, and close. */
  finish(): Promise<void>;
  abort(): Promise<void>;
}

function writeFailure(name: string, err: unknown): VaultError {
  if (err instanceof VaultError) return err;
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'EPIPE' || code === 'ERR_STREAM_DESTROYED') return new VaultError(name, 'closed by its reader before the whole disk was written (broken pipe)');
  return new VaultError(name, `cannot be written: ${describeFsError(err)}`);
}

/** A device or FIFO: positional writes on a block device, in order on the others (they cannot seek). */
class DescriptorSink implements ByteSink {
  private constructor(
    private readonly name: string,
    private readonly fh: FileHandle,
    private readonly positional: boolean,
  ) {}

  static async open(target: OutputTarget & { path: string }, length: number): Promise<DescriptorSink> {
    const block = target.kind === 'device' && target.device === 'block';
    // O_EXCL on a block device: the kernel refuses one that is mounted or held by another program.
    // Read access too, to measure it. No O_CREAT, no O_TRUNC: a device is written in place.
    const flags = block ? constants.O_RDWR | constants.O_EXCL : constants.O_WRONLY;
    let fh: FileHandle;
    try {
      fh = await open(target.path, flags);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EBUSY') throw new VaultError(target.name, 'is in use (mounted, or held by another program): refusing to write to it');
      throw writeFailure(target.name, err);
    }
    if (block) {
      const size = await blockDeviceSize(fh).catch(async (err: unknown) => {
        await fh.close();
        throw new VaultError(target.name, `cannot measure the device: ${describeFsError(err)}`);
      });
      if (size < length) {
        await fh.close();
        throw new VaultError(target.name, `is a block device of ${size} bytes, smaller than the ${length} bytes to write`);
      }
    }
    return new DescriptorSink(target.name, fh, block);
  }

  async write(chunk: Buffer, position: number): Promise<void> {
    try {
      let done = 0;
      while (done < chunk.length) {
        const { bytesWritten } = await this.fh.write(chunk, done, chunk.length - done, this.positional ? position + done : null);
        if (bytesWritten === 0) throw new VaultError(this.name, `no space left at offset ${position + done}`);
        done += bytesWritten;
      }
    } catch (err) {
      throw writeFailure(this.name, err);
    }
  }

  async finish(): Promise<void> {
    try {
      await this.fh.sync();
    } catch (err) {
      // Character devices and FIFOs have nothing to flush (/dev/null answers EINVAL).
      const code = (err as NodeJS.ErrnoException).code;
      if (this.positional || (code !== 'EINVAL' && code !== 'ENOTSUP' && code !== 'EROFS')) {
        await this.abort();
        throw writeFailure(this.name, err);
      }
    }
    await this.fh.close();
  }

  async abort(): Promise<void> {
    await this.fh.close().catch(() => undefined);
  }
}

/** Standard output, through Node's stream (it may be a pipe, a file or a device), each write awaited. */
class StdoutSink implements ByteSink {
  private failure: unknown = null;
  private readonly name = 'standard output';

  constructor(private readonly stream: NodeJS.WriteStream) {
    if (stream.isTTY) throw new VaultError(this.name, 'is a terminal: redirect it to a file or a pipe');
    // Kept for the process's life: a late EPIPE must not become an uncaught exception.
    stream.on('error', (err) => {
      this.failure ??= err;
    });
  }

  write(chunk: Buffer): Promise<void> {
    if (this.failure) return Promise.reject(writeFailure(this.name, this.failure));
    return new Promise((resolveWrite, reject) => {
      try {
        this.stream.write(chunk, (err) => (err ? reject(writeFailure(this.name, err)) : resolveWrite()));
      } catch (err) {
        reject(writeFailure(this.name, err));
      }
    });
  }

  async finish(): Promise<void> {
    if (this.failure) throw writeFailure(this.name, this.failure);
  }

  async abort(): Promise<void> {}
}

/** Open a device or stream target for `length` bytes (a block device must hold them all). */
export async function openSink(target: OutputTarget, length: number): Promise<ByteSink> {
  if (target.kind === 'file') throw new Error('a file target is replaced atomically, not written through a sink');
  if (target.path === null) return new StdoutSink(process.stdout);
  return DescriptorSink.open({ ...target, path: target.path }, length);
}

/**
 * Write a streamed image whose length is known: a file target atomically
 * (nothing appears under its name unless complete), a device or stream in order.
 */
export async function writeImage(target: OutputTarget, image: SynthesizedImage, onProgress?: OnProgress): Promise<void> {
  let at = 0;
  const each = async (write: (chunk: Buffer, offset: number) => Promise<void>) => {
    for await (const chunk of image.stream as AsyncIterable<Buffer>) {
      await write(chunk, at);
      at += chunk.length;
      onProgress?.(at, image.length, at); // in bytes: the stream has no block boundaries
    }
    if (at !== image.length) throw new Error(`synthesized ${at} bytes, announced ${image.length}`);
  };
  if (target.kind === 'file') {
    const file = await AtomicFile.create(target.path);
    await file.commit(() =>
      each(async (chunk, offset) => {
        await file.handle.write(chunk, 0, chunk.length, offset);
        file.wrote(chunk.length);
      }),
    );
    return;
  }
  const sink = await openSink(target, image.length);
  try {
    await each((chunk, offset) => sink.write(chunk, offset));
    await sink.finish();
  } catch (err) {
    await sink.abort();
    throw err;
  }
}
