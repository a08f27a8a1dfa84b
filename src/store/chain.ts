import { basename } from 'node:path';
import type { VhdDisk } from '../vhd/disk.js';
import type { BlockSource } from '../vhd/source.js';
import { blocksWithData } from '../vhd/synthesize.js';
import { DigestReader, digestOf, zeroDigest } from './digests.js';
import { VaultError } from '../util/errors.js';
import { openDisk } from '../vhd/openDisk.js';
import { VhdChain } from '../vhd/VhdChain.js';
import type { BackupMetadata, Repository } from './repository.js';
import { loadBlockMap } from './blockObjects.js';
import { ObjectBackupDisk } from './ObjectBackupDisk.js';

/**
 * A backup's ancestors from the repository's own metadata, the backup first:
 * parents are found by id in the disk's folder, never through the locators in
 * the VHDs (which may name paths outside a moved or copied repository).
 */
export async function lineage(repo: Repository, meta: BackupMetadata): Promise<BackupMetadata[]> {
  const out = [meta];
  const seen = new Set([meta.id]);
  for (let m = meta; m.parent !== null; ) {
    const parentId = m.parent;
    if (seen.has(parentId)) throw new VaultError(repo.diskDir(meta.disk), `backup ${m.id}: its parent chain loops back to ${parentId}`);
    const parent = await repo.backup(meta.disk, parentId).catch((err: unknown) => {
      if (!(err instanceof VaultError)) throw err;
      throw new VaultError(repo.diskDir(meta.disk), `backup ${m.id}: its parent backup ${parentId} is not in the repository`);
    });
    seen.add(parentId);
    out.push(parent);
    m = parent;
  }
  return out;
}

/** Open one backup's data, naming the backup when it cannot be opened. */
export async function openBackupData(repo: Repository, meta: BackupMetadata): Promise<VhdDisk> {
  const path = repo.dataPath(meta.disk, meta.id, meta.layout);
  let disk: VhdDisk;
  try {
    disk = await openDisk(path);
  } catch (err) {
    if (!(err instanceof VaultError)) throw err;
    throw new VaultError(err.file, `${err.problem} (data of backup ${meta.id})`);
  }
  if (disk.footer.uuid !== meta.uuid) {
    await disk.close();
    throw new VaultError(path, `has UUID ${disk.footer.uuid}, backup ${meta.id} records ${meta.uuid}`);
  }
  return disk;
}

/** A backup's digests, one per block of the disk at that backup (a file, or the objects layout's block map). */
export async function openDigests(repo: Repository, meta: BackupMetadata, options: { fresh?: boolean } = {}): Promise<{ get(block: number): Promise<Buffer>; close(): Promise<void> }> {
  if (meta.layout === 'objects') return loadBlockMap(repo, meta, options);
  return DigestReader.open(repo.digestsPath(meta.disk, meta.id), meta.blockCount);
}

/**
 * The chain a restore reads for `meta`, resolved by metadata and checked link by
 * link. In the objects layout a backup's map is the whole disk: a chain of one.
 * `fresh` reads an object store's maps from the store, not the local cache (verify).
 */
export async function openBackupChain(repo: Repository, meta: BackupMetadata, options: { fresh?: boolean } = {}): Promise<VhdChain> {
  if (meta.layout === 'objects') return VhdChain.fromMembers([await ObjectBackupDisk.open(repo, meta, options)]);
  const members: VhdDisk[] = [];
  try {
    for (const m of await lineage(repo, meta)) members.push(await openBackupData(repo, m));
  } catch (err) {
    await Promise.all(members.map((m) => m.close()));
    throw err;
  }
  return VhdChain.fromMembers(members);
}

/** Which backup a chain member is (its data is named `<id>.vhd` or `<id>.vhd-dir`). */
const backupIdOf = (path: string) => basename(path).replace(/\.(vhd-dir|vhd|digests)$/, '');

/**
 * The backup's chain as a block source whose every block is checked against
 * the backup's digests: wrong data fails, naming the backup and block, instead
 * of being emitted.
 */
export async function verifiedChain(repo: Repository, meta: BackupMetadata): Promise<{ chain: VhdChain; source: BlockSource }> {
  const chain = await openBackupChain(repo, meta);
  let digests: Awaited<ReturnType<typeof openDigests>>;
  try {
    if (chain.size !== meta.size || chain.blockCount !== meta.blockCount) {
      throw new VaultError(chain.top.path, `holds ${chain.size} bytes, backup ${meta.id} records ${meta.size}`);
    }
    digests = chain.top instanceof ObjectBackupDisk ? chain.top.map : await openDigests(repo, meta);
  } catch (err) {
    await chain.close();
    throw err;
  }
  const zero = zeroDigest(meta.blockSize);
  const readBlock = async (block: number): Promise<Buffer | null> => {
    const data = await chain.readBlock(block);
    const expected = await digests.get(block);
    if (!(data ? digestOf(data) : zero).equals(expected)) {
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
