import { VaultError } from '../util/errors.js';
import type { Finding } from './finding.js';
import { deletingId, pendingId } from './keys.js';
import { dataSuffixes } from './layouts/index.js';
import { lineage } from './lineage.js';
import { isBackupId } from './names.js';
import type { BackupMetadata, Repository } from './repository.js';

export type { Finding } from './finding.js';

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
  const suffixes = ['.json', ...dataSuffixes()].map((s) => s.replace('.', '\\.'));
  const dataNames = new RegExp(`^(.+)(${suffixes.join('|')})$`);
  for (const name of [...names].sort()) {
    const m = dataNames.exec(name);
    if (!m || !isBackupId(m[1]!) || listed.has(m[1]!) || committing.has(m[1]!) || deleting.has(m[1]!)) continue;
    // Metadata that is there but cannot be read is reported by Repository.backups(), with why; its data is not an orphan.
    if (m[2] === '.json' || names.has(`${m[1]}.json`)) continue;
    findings.push({ disk, id: null, kind: 'orphan', problem: `${repo.diskDir(disk)}/${name} belongs to no listed backup (its metadata ${m[1]}.json is missing): left in place` });
  }
  for (const meta of backups) {
    for (const f of repo.layoutOf(meta).missingFiles(repo, meta, names)) findings.push({ disk, id: meta.id, ...f });
    if (meta.parent !== null && !listed.has(meta.parent)) findings.push({ disk, id: meta.id, kind: 'missing-parent', problem: missingParent(repo, disk, meta.parent, names) });
  }
  return findings;
}

/** A parent that is not listed: gone, or there with metadata that cannot be read (reported on its own, with why). */
function missingParent(repo: Repository, disk: string, parent: string, names: Set<string>): string {
  if (!names.has(`${parent}.json`)) return `its parent backup ${parent} is not in the repository`;
  return `its parent backup ${parent} cannot be read (its metadata ${repo.storage.describe(repo.metadataKey(disk, parent))} is unreadable)`;
}

/**
 * What is wrong with the structure of a disk's backups, without reading block
 * data (each layout checks its own: data and digests present and of the right
 * shape, UUIDs as recorded, parents linked as the metadata says).
 */
export async function structureFindings(repo: Repository, backups: BackupMetadata[], options: { digests?: boolean } = {}): Promise<Finding[]> {
  const findings: Finding[] = [];
  for (const layout of new Set(backups.map((b) => repo.layoutOf(b)))) {
    findings.push(...(await layout.structureFindings(repo, backups.filter((b) => repo.layoutOf(b) === layout), options)));
  }
  return findings;
}

/** Everything structurally wrong with a disk's backups: what verify reports besides block data, and what stops prune. */
export async function diskFindings(repo: Repository, disk: string, backups: BackupMetadata[]): Promise<Finding[]> {
  // Each backup's digests are read too: a prune deletes digests files, and one may hold another backup's.
  return [...(await fileFindings(repo, disk, backups)), ...(await structureFindings(repo, backups, { digests: true }))];
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
  const names = new Set(await repo.storage.list(repo.diskKey(meta.disk)));
  const findings: Finding[] = [];
  for (const m of members) for (const f of repo.layoutOf(m).missingFiles(repo, m, names)) findings.push({ disk: m.disk, id: m.id, ...f });
  return [...findings, ...(await structureFindings(repo, members))];
}
