/**
 * Direct mode's copy-before-write target. The clusters QEMU copies out of a
 * running disk before a guest write lands go straight to the backup target:
 * a sparse file beside the new backup's staged files, written within the
 * --max-write pace the backup's own writes share, but ahead of them (the
 * guest's write waits for its copy: the slow path fleecing avoids). QEMU reads them back through the
 * frozen view when the backup reaches them. The file is never committed:
 * it is deleted when the backup ends, and by the next run after a kill.
 */
import { type FileHandle, open, rm } from 'node:fs/promises';
import type { NbdExport, ReadPiece } from '../nbd/export.js';
import type { Extent } from '../nbd/transmission.js';
import type { Limiter } from '../store/throttle.js';

/** Zeros written per request when QEMU asks for a zeroed range. */
const ZERO_CHUNK = 1024 * 1024;

export class CopyStore implements NbdExport {
  readonly writable = true;
  /** Bytes QEMU copied here (each cluster at most once per backup). */
  copiedBytes = 0;
  /** Copy requests: one per cluster run a guest write touched first. */
  copies = 0;
  /** The first write that failed (the backup target full, say): QEMU then gives up the frozen view. */
  failure: Error | null = null;

  private constructor(
    readonly path: string,
    readonly size: number,
    private readonly fh: FileHandle,
    private readonly limit: Limiter,
  ) {}

  /** A new sparse file of `size` bytes at `path`, which must not exist. */
  static async create(path: string, size: number, limit: Limiter): Promise<CopyStore> {
    const fh = await open(path, 'wx+');
    try {
      await fh.truncate(size);
    } catch (err) {
      await fh.close();
      await rm(path, { force: true });
      throw err;
    }
    return new CopyStore(path, size, fh, limit);
  }

  async read(offset: number, length: number): Promise<ReadPiece[]> {
    const data = Buffer.alloc(length);
    for (let at = 0; at < length; ) {
      const { bytesRead } = await this.fh.read(data, at, length - at, offset + at);
      if (bytesRead === 0) break; // (cannot happen: the file has the export's size)
      at += bytesRead;
    }
    return [{ offset, data }];
  }

  /** Everything reads as data: QEMU only reads back what it copied. */
  async allocation(_offset: number, length: number): Promise<Extent[]> {
    return [{ length, flags: 0 }];
  }

  write(offset: number, data: Buffer, fua: boolean): Promise<void> {
    return this.noting(async () => {
      await this.limit.takeFirst(data.length);
      for (let at = 0; at < data.length; ) {
        const { bytesWritten } = await this.fh.write(data, at, data.length - at, offset + at);
        at += bytesWritten;
      }
      this.copiedBytes += data.length;
      this.copies++;
      if (fua) await this.fh.datasync();
    });
  }

  /** A copied cluster that reads as zeros (QEMU sends no data for it). */
  writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    return this.noting(async () => {
      const zeros = Buffer.alloc(Math.min(length, ZERO_CHUNK));
      for (let at = 0; at < length; at += zeros.length) {
        const n = Math.min(zeros.length, length - at);
        await this.limit.takeFirst(n);
        await this.fh.write(zeros, 0, n, offset + at);
      }
      this.copiedBytes += length;
      this.copies++;
      if (fua) await this.fh.datasync();
    });
  }

  flush(): Promise<void> {
    return this.noting(() => this.fh.datasync());
  }

  /** Run a write; its failure is kept (the server only sends QEMU an errno). */
  private async noting(write: () => Promise<void>): Promise<void> {
    try {
      await write();
    } catch (err) {
      this.failure ??= err as Error;
      throw err;
    }
  }

  /** Close and delete the file: the copies were only needed while the backup read them. */
  async remove(): Promise<void> {
    await this.fh.close().catch(() => undefined);
    await rm(this.path, { force: true });
  }
}
