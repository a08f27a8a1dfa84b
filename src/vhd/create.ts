import { dirname, relative, resolve } from 'node:path';
import { pathExists } from '../util/files.js';
import { UsageError, VaultError } from '../util/errors.js';
import type { Compression } from './compression.js';
import { DEFAULT_BLOCK_SIZE } from './constants.js';
import { VhdChain } from './VhdChain.js';
import { VhdDirectoryWriter } from './VhdDirectory.js';
import { DynamicVhdWriter, type WriterOptions } from './VhdWriter.js';

export interface StorageOptions {
  /** A VHD file (default) or an exploded directory. */
  layout?: 'file' | 'dir';
  /** Codec of a directory's files. */
  compression?: Compression;
}

/** `vhd create` never replaces anything: an existing file may be a chain member or someone's data. */
async function createEmpty(path: string, options: WriterOptions & StorageOptions): Promise<void> {
  if (await pathExists(path)) throw new VaultError(path, 'already exists: vhd create never replaces a file');
  const writer =
    options.layout === 'dir'
      ? await VhdDirectoryWriter.create(path, options)
      : await DynamicVhdWriter.create(path, options);
  await writer.finish();
}

/** Create an empty dynamic VHD (no block allocated). */
export async function createDynamicVhd(path: string, options: { size: number; blockSize?: number } & StorageOptions): Promise<void> {
  await createEmpty(path, options);
}

/**
 * Create an empty differencing VHD on top of `parentPath` (itself validated
 * with its whole chain). It takes the parent's size (a `size` given must equal
 * it) and block size and records the parent by UUID, by relative (W2ru) and
 * absolute (W2ku) locators: the path given, so a parent named by its Xen
 * Orchestra alias stays named by its alias.
 */
export async function createDifferencingVhd(
  path: string,
  parentPath: string,
  options: { size?: number; blockSize?: number } & StorageOptions = {},
): Promise<void> {
  const parentChain = await VhdChain.open(parentPath);
  try {
    const parent = parentChain.top;
    if (options.size !== undefined && options.size !== parent.size) {
      throw new UsageError(`--size ${options.size} differs from the parent's size (${parent.size} bytes): a differencing disk has its parent's size (leave --size out)`);
    }
    const absolutePath = resolve(parentPath);
    const relativePath = relative(dirname(resolve(path)), absolutePath);
    await createEmpty(path, {
      ...options,
      size: parent.size,
      blockSize: parent.header ? parent.blockSize : (options.blockSize ?? DEFAULT_BLOCK_SIZE),
      parent: { uuid: parent.footer.uuid, timestamp: parent.footer.timestamp, relativePath, absolutePath },
    });
  } finally {
    await parentChain.close();
  }
}
