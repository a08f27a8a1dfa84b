import { openStorage } from '../storage/open.js';
import type { Storage, StorageDescriptor } from '../storage/Storage.js';
import { fullBitmap } from '../vhd/bitmap.js';
import { type Compression, compress } from '../vhd/compression.js';
import { digestOf, zeroDigest } from './digests.js';

/** One block handed to a worker thread (the data's ArrayBuffer is transferred). */
export interface BlockTask {
  block: number;
  data: ArrayBuffer;
  byteOffset: number;
  length: number;
  /** The block's digest in the previous backup; null for a full backup. */
  previousDigest: Uint8Array | null;
  compression: Compression;
  /** Objects layout: the stored bytes are the block's data alone, without the VHD sector bitmap. */
  bare?: boolean;
  /** dir layout: the block object to create (the worker reopens the storage); vhd layout: null (the data comes back to be appended). */
  target: BlockTarget | null;
  /**
   * dir layout under a write-rate limit: prepare the file's bytes but do not write
   * them; the main thread paces them and hands them to writePreparedBlock().
   */
  deferWrite?: boolean;
}

/** Where a worker creates a block: a key in a storage it reopens from the descriptor. */
export interface BlockTarget {
  storage: StorageDescriptor;
  key: string;
  /**
   * Stored whole and durably (put), not created fast under a staged folder: a
   * block object has its final name at once, and an existing one (same name, same
   * content) is simply replaced.
   */
  whole?: boolean;
}

/** A prepared block file, written by a second task once the write limiter allows it. */
export interface WriteTask {
  target: BlockTarget;
  parts: Uint8Array[];
}

export interface BlockResult {
  block: number;
  digest: Uint8Array;
  /** True when this backup must store the block. */
  store: boolean;
  /** The block's bytes, handed back (transferred) to be written (vhd layout) and then recycled. */
  data: Uint8Array;
  storedBytes: number;
  /** With deferWrite: the block file's bytes, still to be written. */
  prepared?: Uint8Array[];
  digestMs: number;
  compressMs: number;
  writeMs: number;
}

const now = () => performance.now();

/**
 * Digest a block, decide whether the backup stores it (changed since the
 * previous backup; in a full backup, not all zero), and for the dir layout
 * compress it and write its file (the file's folder is a temporary directory,
 * flushed to disk and renamed into place only when the backup is complete).
 */
export async function processBlock(task: BlockTask): Promise<BlockResult> {
  const data = new Uint8Array(task.data, task.byteOffset, task.length);
  let t = now();
  const digest = digestOf(data);
  const digestMs = now() - t;
  const store = task.previousDigest === null ? !digest.equals(zeroDigest(task.length)) : !digest.equals(task.previousDigest);
  const result: BlockResult = { block: task.block, digest, store, data, storedBytes: 0, digestMs, compressMs: 0, writeMs: 0 };
  if (!store) return result;
  if (task.target === null) {
    result.storedBytes = data.length;
    return result;
  }
  t = now();
  const head = task.bare ? [] : [fullBitmap(task.length)];
  // Uncompressed blocks are written as two pieces: no 2 MiB copy to join them.
  const parts = task.compression === 'none' ? [...head, data] : [await compress(task.compression, Buffer.concat([...head, data]))];
  result.compressMs = task.compression === 'none' ? 0 : now() - t;
  result.storedBytes = parts.reduce((n, p) => n + p.length, 0);
  if (task.deferWrite) {
    result.prepared = parts;
    return result;
  }
  result.writeMs = await writePreparedBlock({ target: task.target, parts });
  return result;
}

/** Storages this worker has opened, by descriptor: one per repository. */
const storages = new Map<string, Promise<Storage>>();

function storageFor(descriptor: StorageDescriptor): Promise<Storage> {
  const id = JSON.stringify(descriptor);
  const known = storages.get(id);
  if (known) return known;
  const opened = openStorage(descriptor);
  storages.set(id, opened);
  return opened;
}

/** Create a block file from its prepared bytes; returns the milliseconds spent. */
export async function writePreparedBlock(task: WriteTask): Promise<number> {
  const t = now();
  // Made durable all at once, before the backup's directory is renamed into place.
  const storage = await storageFor(task.target.storage);
  if (task.target.whole) await storage.put(task.target.key, Buffer.concat(task.parts));
  else await storage.create(task.target.key, task.parts);
  return now() - t;
}
