import { openStorage } from '../storage/open.js';
import type { Storage, StorageDescriptor } from '../storage/Storage.js';
import { fullBitmap } from '../vhd/bitmap.js';
import { type Compression, compress } from '../vhd/compression.js';
import { type Digester, digesterFor } from './digests.js';
import { type Sealing, sealedStorage } from './sealing.js';

/** Where a worker creates a block: a key in a storage it reopens from the descriptor. */
export interface BlockTarget {
  storage: StorageDescriptor;
  key: string;
  /** The repository is encrypted: what is stored is sealed with these keys. */
  sealing?: Sealing;
  /**
   * Stored whole and durably (put), not created fast under a staged folder: a
   * block object has its final name at once, and an existing one (same name, same
   * content) is simply replaced.
   */
  whole?: boolean;
}

/** What a worker does with a block the new backup stores (the layout's writer decides). */
export type BlockOutput =
  /** Hand the data back: the main thread stores it, in block order. */
  | { kind: 'data' }
  /** Compress it and hand the stored bytes back, to be written once paced or named (writeBlock). */
  | { kind: 'prepare' }
  /** Compress it and write it at the target. */
  | { kind: 'write'; target: BlockTarget };

/** One block handed to a worker thread (the data's ArrayBuffer is transferred). */
export interface BlockTask {
  block: number;
  data: ArrayBuffer;
  byteOffset: number;
  length: number;
  /** The block's digest in the previous backup; null for a full backup. */
  previousDigest: Uint8Array | null;
  /** The repository's MAC key when it is encrypted (digests are HMAC-SHA256 then), else null. */
  digestKey: Uint8Array | null;
  compression: Compression;
  /** The stored bytes are the block's data alone, without the VHD sector bitmap (block objects). */
  bare: boolean;
  output: BlockOutput;
}

/** A prepared block, written by a second task once the main thread says where and when. */
export interface WriteTask {
  target: BlockTarget;
  parts: Uint8Array[];
}

export interface BlockResult {
  block: number;
  digest: Uint8Array;
  /** True when this backup must store the block. */
  store: boolean;
  /** The block's bytes, handed back (transferred) to be stored by the main thread and then recycled. */
  data: Uint8Array;
  storedBytes: number;
  /** Output 'prepare': the stored bytes, still to be written. */
  prepared?: Uint8Array[];
  digestMs: number;
  compressMs: number;
  writeMs: number;
}

const now = () => performance.now();

/**
 * Digest a block, decide whether the backup stores it (changed since the
 * previous backup; in a full backup, not all zero), and do with it what the
 * layout's writer asked: hand it back, or compress it and write it (or hand
 * the compressed bytes back). Files created at a staged name are made durable
 * together before the backup's commit.
 */
export async function processBlock(task: BlockTask): Promise<BlockResult> {
  const data = new Uint8Array(task.data, task.byteOffset, task.length);
  let t = now();
  const digester = digesterOf(task.digestKey);
  const digest = digester.of(data);
  const digestMs = now() - t;
  const store = task.previousDigest === null ? !digest.equals(digester.zero(task.length)) : !digest.equals(task.previousDigest);
  const result: BlockResult = { block: task.block, digest, store, data, storedBytes: 0, digestMs, compressMs: 0, writeMs: 0 };
  if (!store) return result;
  if (task.output.kind === 'data') {
    result.storedBytes = data.length;
    return result;
  }
  t = now();
  const head = task.bare ? [] : [fullBitmap(task.length)];
  // Uncompressed blocks are written as two pieces: no 2 MiB copy to join them.
  const parts = task.compression === 'none' ? [...head, data] : [await compress(task.compression, Buffer.concat([...head, data]))];
  result.compressMs = task.compression === 'none' ? 0 : now() - t;
  result.storedBytes = parts.reduce((n, p) => n + p.length, 0);
  if (task.output.kind === 'prepare') {
    result.prepared = parts;
    return result;
  }
  result.writeMs = await writePreparedBlock({ target: task.output.target, parts });
  return result;
}

/** Digesters this worker has made, by key: the zero block's digest is computed once each. */
const digesters = new Map<string, Digester>();

function digesterOf(key: Uint8Array | null): Digester {
  const id = key === null ? '' : Buffer.from(key).toString('hex');
  let d = digesters.get(id);
  if (!d) digesters.set(id, (d = digesterFor(key)));
  return d;
}

/** Storages this worker has opened, by descriptor and repository: one per repository. */
const storages = new Map<string, Promise<Storage>>();

function storageFor(target: BlockTarget): Promise<Storage> {
  const { storage: descriptor, sealing } = target;
  const id = `${JSON.stringify(descriptor)}\0${sealing?.repositoryId ?? ''}`;
  const known = storages.get(id);
  if (known) return known;
  const opened = openStorage(descriptor).then((inner) => (sealing ? sealedStorage(inner, sealing) : inner));
  storages.set(id, opened);
  return opened;
}

/** Create a block file or object from its prepared bytes; returns the milliseconds spent. */
export async function writePreparedBlock(task: WriteTask): Promise<number> {
  const t = now();
  const storage = await storageFor(task.target);
  // As pieces: no 2 MiB copy to join them.
  if (task.target.whole) await storage.put(task.target.key, task.parts);
  else await storage.create(task.target.key, task.parts);
  return now() - t;
}
