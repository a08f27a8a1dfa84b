import { LocalStorage } from './LocalStorage.js';
import type { Storage, StorageDescriptor } from './Storage.js';

/** Reopen the storage a descriptor names (in a worker thread, say); the S3 client loads only for an S3 one. */
export async function openStorage(d: StorageDescriptor): Promise<Storage> {
  if (d.kind === 'local') return new LocalStorage(d.root);
  if (d.kind === 's3') return (await import('./S3Storage.js')).openS3Storage(d);
  throw new Error(`unknown storage kind ${String((d as { kind: unknown }).kind)}`);
}
