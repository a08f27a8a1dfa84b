import { join } from 'node:path';
import type { VhdDisk } from '../vhd/disk.js';
import { VaultError } from '../util/errors.js';
import { checkParent } from '../vhd/VhdChain.js';
import { blockFile, VhdDirectory } from '../vhd/VhdDirectory.js';
import { key, type Storage } from '../storage/Storage.js';
import { lineage, openBackupData } from './chain.js';
import { DIGEST_SIZE } from './digests.js';
import { blockObjectKey, loadBlockMap } from './blockObjects.js';
import { isBackupId } from './names.js';
import { type BackupMetadata, deletingId, pendingId, type Repository } from './repository.js';

/** A problem with one backup's structure, or with a file no backup accounts for. */
export interface Finding {
  disk: string;
  /** What is wrong, for callers that treat kinds differently (verify skips reading a backup whose data or parent is gone). */
  kind: 'metadata' | 'orphan' | 'pending' | 'missing-data' | 'missing-digests' | 'missing-parent' | 'structure';
  /** The backup concerned; null for files that belong to no listed backup. */
  id: string | null;
  problem: string;
}

/**
 * Blocks a directory's bat marks present whose files are not there: a merge
 * moves block files, so it must know every one exists before it starts. One
 * readdir per 1000 blocks; block contents are verify's business.
 */
async function missingBlockFiles(storage: Storage, dataKey: string, dir: VhdDirectory): Promise<number[]> {
  const missing: number[] = [];
  const folders = new Map<number, Set<string>>();
  for (let b = 0; b < dir.blockCount; b++) {
    if (!dir.isAllocated(b)) continue;
    const folder = Math.floor(b / 1000);
    if (!folders.has(folder)) folders.set(folder, new Set(await storage.list(key(dataKey, 'blocks', String(folder)))));
    if (!folders.get(folder)!.has(String(b % 1000))) missing.push(b);
  }
  return missing;
}

/** The keys of a disk's block objects (objects layout): one listing, a page per 1000 objects. */
async function storedObjects(repo: Repository, disk: string): Promise<Set<string>> {
  const keys = new Set<string>();
  for await (const o of repo.storage.listAll(repo.blocksKey(disk))) keys.add(o.key);
  return keys;
}

/** Blocks whose object the backup's map names but the store lacks: a delta over them would name them too. */
async function missingObjects(repo: Repository, meta: BackupMetadata, present: Set<string>): Promise<Array<{ block: number; key: string }>> {
  const map = await loadBlockMap(repo, meta);
  const missing: Array<{ block: number; key: string }> = [];
  for (let b = 0; b < map.blockCount; b++) {
    if (!map.hasObject(b)) continue;
    const k = blockObjectKey(repo, meta.disk, map.digest(b));
    if (!present.has(k)) missing.push({ block: b, key: k });
  }
  return missing;
}

/**
 * Files of a disk's folder that no committed backup accounts for, and backups
 * missing a file they need: data or digests without metadata (left in place:
 * only a person can tell a lost metadata file from rubbish), a commit that
 * cannot be finished, a backup without its data, digests or parent. Reads the
 * folder's names only. The cheap check `list` runs.
 */
export async function fileFindings(repo: Repository, disk: string, backups: BackupMetadata[]): Promise<Finding[]> {
  const findings: Finding[] = [];
  const names = new Set(await repo.storage.list(repo.diskKey(disk)));
  const listed = new Set(backups.map((b) => b.id));
  const committing = new Set([...names].map(pendingId).filter((id): id is string => id !== null));
  // What a killed prune was deleting is garbage the next writer removes, not a finding.
  const deleting = new Set([...names].map(deletingId).filter((id): id is string => id !== null));
  for (const id of committing) {
    // One the next backup or prune will finish is work in progress, not damage.
    if (await repo.canFinishCommit(disk, id)) continue;
    findings.push({ disk, id, kind: 'pending', problem: `an interrupted commit cannot be finished (its metadata, data or digests are damaged or missing): ${repo.storage.describe(repo.pendingMetadataKey(disk, id))} and whatever data it names are left in place` });
  }
  for (const name of [...names].sort()) {
    const m = /^(.+)\.(vhd-dir|vhd|digests|json)$/.exec(name);
    if (!m || !isBackupId(m[1]!) || listed.has(m[1]!) || committing.has(m[1]!) || deleting.has(m[1]!)) continue;
    if (m[2] === 'json') continue; // unreadable metadata: reported by Repository.backups()
    findings.push({ disk, id: null, kind: 'orphan', problem: `${repo.diskDir(disk)}/${name} belongs to no listed backup (its metadata ${m[1]}.json is missing): left in place` });
  }
  for (const meta of backups) {
    const problem = (kind: Finding['kind'], text: string) => findings.push({ disk, id: meta.id, kind, problem: text });
    // (In the objects layout the data is the block map: a missing one is said once, below.)
    if (meta.layout !== 'objects' && !names.has(repo.dataName(meta.id, meta.layout))) problem('missing-data', `its data ${repo.dataPath(disk, meta.id, meta.layout)} is missing`);
    if (!names.has(`${meta.id}.digests`)) {
      // In the objects layout the map is the backup's data: nothing of it can be read.
      if (meta.layout === 'objects') problem('missing-data', `its block map ${repo.digestsPath(disk, meta.id)} is missing`);
      else problem('missing-digests', `its digests file ${repo.digestsPath(disk, meta.id)} is missing`);
    }
    if (meta.parent !== null && !listed.has(meta.parent)) problem('missing-parent', `its parent backup ${meta.parent} is not in the repository`);
  }
  return findings;
}

/**
 * What is wrong with the structure of a disk's backups, without reading block
 * data: every backup's data and digests present and of the right shape, its
 * VHD's UUID as recorded, its parent listed and linked as the metadata says.
 * Each backup's data is opened once (headers and tables only).
 */
export async function structureFindings(repo: Repository, backups: BackupMetadata[]): Promise<Finding[]> {
  const findings: Finding[] = [];
  const opened = new Map<string, VhdDisk>();
  // Objects layout: the names of the disk's block objects, listed once (what missingBlockFiles reads per directory).
  let present: Set<string> | undefined;
  try {
    for (const meta of backups) {
      const problem = (text: string) => findings.push({ disk: meta.disk, id: meta.id, kind: 'structure', problem: text });
      const dataKey = repo.dataKey(meta.disk, meta.id, meta.layout);
      if (!(await repo.storage.head(dataKey))) continue; // fileFindings names it
      // Objects layout: no VHD to open; the map's size, and that every object it names is there (their content is verify's).
      if (meta.layout === 'objects') {
        const size = (await repo.storage.head(dataKey))!.size;
        if (size !== meta.blockCount * DIGEST_SIZE) problem(`its block map ${repo.digestsPath(meta.disk, meta.id)} has ${size} bytes, ${meta.blockCount * DIGEST_SIZE} expected`);
        else {
          present ??= await storedObjects(repo, meta.disk);
          const missing = await missingObjects(repo, meta, present);
          if (missing.length > 0) problem(`${missing.length} block object${missing.length > 1 ? 's' : ''} its block map names ${missing.length > 1 ? 'are' : 'is'} missing (block ${missing[0]!.block}: ${repo.storage.describe(missing[0]!.key)}${missing.length > 1 ? ', …' : ''})`);
        }
        continue;
      }
      try {
        const disk = await openBackupData(repo, meta);
        opened.set(meta.id, disk);
        if (disk instanceof VhdDirectory) for (const b of await missingBlockFiles(repo.storage, dataKey, disk)) problem(`${join(disk.path, blockFile(b))}: block ${b} is missing although the bat marks it present`);
      } catch (err) {
        if (!(err instanceof VaultError)) throw err;
        problem(err.message);
      }
      const digests = repo.digestsPath(meta.disk, meta.id);
      const size = (await repo.storage.head(repo.digestsKey(meta.disk, meta.id)))?.size ?? null;
      if (size !== null && size !== meta.blockCount * DIGEST_SIZE) problem(`its digests file ${digests} has ${size} bytes, ${meta.blockCount * DIGEST_SIZE} expected`);
    }
    for (const meta of backups) {
      const disk = opened.get(meta.id);
      const parent = meta.parent === null ? undefined : opened.get(meta.parent);
      if (!disk || (meta.parent !== null && !parent)) continue;
      try {
        if (parent && disk.footer.diskType !== 'differencing') throw new VaultError(disk.path, `is a ${disk.footer.diskType} disk, but backup ${meta.id} is a delta of ${meta.parent}`);
        if (!parent && disk.footer.diskType === 'differencing') throw new VaultError(disk.path, `is a differencing disk, but backup ${meta.id} is recorded as full`);
        if (parent) checkParent(disk, parent);
      } catch (err) {
        if (!(err instanceof VaultError)) throw err;
        findings.push({ disk: meta.disk, id: meta.id, kind: 'structure', problem: err.message });
      }
    }
  } finally {
    await Promise.all([...opened.values()].map((d) => d.close()));
  }
  return findings;
}

/** Everything structurally wrong with a disk's backups: what verify reports besides block data, and what stops prune. */
export async function diskFindings(repo: Repository, disk: string, backups: BackupMetadata[]): Promise<Finding[]> {
  return [...(await fileFindings(repo, disk, backups)), ...(await structureFindings(repo, backups))];
}

/**
 * What is wrong with one backup's chain (the backup and its ancestors by
 * metadata): members, data, digests, block files and links. What a new delta
 * over that backup needs to be sound.
 */
export async function lineageFindings(repo: Repository, meta: BackupMetadata): Promise<Finding[]> {
  let members: BackupMetadata[];
  try {
    members = await lineage(repo, meta);
  } catch (err) {
    if (!(err instanceof VaultError)) throw err;
    return [{ disk: meta.disk, id: meta.id, kind: 'missing-parent', problem: err.message }];
  }
  const findings: Finding[] = [];
  for (const m of members) {
    if (m.layout !== 'objects' && !(await repo.storage.head(repo.dataKey(m.disk, m.id, m.layout)))) findings.push({ disk: m.disk, id: m.id, kind: 'missing-data', problem: `its data ${repo.dataPath(m.disk, m.id, m.layout)} is missing` });
    if (!(await repo.storage.head(repo.digestsKey(m.disk, m.id)))) findings.push({ disk: m.disk, id: m.id, kind: 'missing-digests', problem: `its ${m.layout === 'objects' ? 'block map' : 'digests file'} ${repo.digestsPath(m.disk, m.id)} is missing` });
  }
  return [...findings, ...(await structureFindings(repo, members))];
}
