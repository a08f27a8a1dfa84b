import type { VhdDisk } from '../vhd/disk.js';
import type { BlockSource } from '../vhd/source.js';
import { blocksWithData } from '../vhd/synthesize.js';
import type { VhdChain } from '../vhd/VhdChain.js';
import { VaultError } from '../util/errors.js';
import type { Digests } from './layouts/Layout.js';
import type { BackupMetadata, Repository } from './repository.js';

/** One backup's own data as a VHD, naming the backup when it cannot be opened. */
export function openBackupData(repo: Repository, meta: BackupMetadata): Promise<VhdDisk> {
  return repo.layoutOf(meta).openData(repo, meta);
}

/** A backup's digests, one per block of the disk at that backup. `fresh`: from the store, never a local cache. */
export function openDigests(repo: Repository, meta: BackupMetadata, options: { fresh?: boolean } = {}): Promise<Digests> {
  return repo.layoutOf(meta).openDigests(repo, meta, options);
}

/**
 * The chain a restore reads for `meta`, resolved by metadata and checked link by
 * link. `fresh` reads an object store's maps from the store, not the local cache (verify).
 */
export function openBackupChain(repo: Repository, meta: BackupMetadata, options: { fresh?: boolean } = {}): Promise<VhdChain> {
  return repo.layoutOf(meta).openChain(repo, meta, options);
}

/** Which backup a chain member is (its data is named `<id>.<extension>`). */
const backupIdOf = (path: string) => /(\d{8}T\d{9}Z-[0-9a-f]{6})\.[^/]*$/.exec(path)?.[1] ?? path;

/**
 * The backup's chain as a block source whose every block is checked against
 * the backup's digests: wrong data fails, naming the backup and block, instead
 * of being emitted.
 */
export async function verifiedChain(repo: Repository, meta: BackupMetadata): Promise<{ chain: VhdChain; source: BlockSource }> {
  const chain = await openBackupChain(repo, meta);
  let digests: Digests;
  try {
    if (chain.size !== meta.size || chain.blockCount !== meta.blockCount) {
      throw new VaultError(chain.top.path, `holds ${chain.size} bytes, backup ${meta.id} records ${meta.size}`);
    }
    digests = await openDigests(repo, meta);
  } catch (err) {
    await chain.close();
    throw err;
  }
  const zero = repo.digester.zero(meta.blockSize);
  const readBlock = async (block: number): Promise<Buffer | null> => {
    const data = await chain.readBlock(block);
    const expected = await digests.get(block);
    if (!(data ? await repo.digester.ofOffThread(data) : zero).equals(expected)) {
      const holder = chain.members.find((m) => m.isAllocated(block));
      const where = holder ? ` (block stored in backup ${backupIdOf(holder.path)})` : ' (no backup of the chain stores it)';
      throw new VaultError(repo.diskDir(meta.disk), `backup ${meta.id} block ${block} does not match its digest${where}`);
    }
    return data;
  };
  const source: BlockSource = {
    size: chain.size,
    blockSize: chain.blockSize,
    blockCount: chain.blockCount,
    readBlock,
    close: async () => {
      await digests.close();
      await chain.close();
    },
  };
  // A block no member stores reads as zeros: its recorded digest must say so too.
  const carried = new Set(blocksWithData(chain));
  for (let b = 0; b < chain.blockCount; b++) {
    if (!carried.has(b) && !(await digests.get(b)).equals(zero)) {
      await source.close();
      throw new VaultError(repo.diskDir(meta.disk), `backup ${meta.id} block ${b} is missing: no backup of its chain stores it`);
    }
  }
  return { chain, source };
}
