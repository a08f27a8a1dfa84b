import { VaultError } from '../util/errors.js';
import { fileFindings, type Finding } from './inspect.js';
import { readingDisk } from './merge.js';
import type { BackupMetadata, Repository } from './repository.js';

export interface Listing {
  /** Committed backups, oldest first across disks (ids start with their UTC creation time). */
  backups: BackupMetadata[];
  /** Warnings: unreadable metadata, files no backup accounts for, backups missing a file. */
  findings: Finding[];
  /** Disks that could not be listed at all (the command fails after listing the others). */
  unreadable: Array<{ disk: string; problem: string }>;
}

/** The backups of one disk or all, read as a reader (never a half-done merge), with what looks wrong beside them. */
export async function listBackups(repo: Repository, disk?: string): Promise<Listing> {
  const listing: Listing = { backups: [], findings: [], unreadable: [] };
  for (const d of disk ? [await repo.requireDisk(disk)] : await repo.disks()) {
    await readingDisk(repo, d, 'list', async () => {
      const backups = await repo.backups(d, (err) => listing.findings.push({ disk: d, id: null, kind: 'metadata', problem: err.message }));
      listing.findings.push(...(await fileFindings(repo, d, backups)));
      listing.backups.push(...backups);
    }).catch((err: unknown) => {
      // A disk that cannot be read (a damaged merge journal) must not hide the others.
      if (!(err instanceof VaultError)) throw err;
      listing.unreadable.push({ disk: d, problem: err.message });
    });
  }
  listing.backups.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : a.disk < b.disk ? -1 : 1));
  return listing;
}

/** One line for a finding, as list, verify and prune print it. */
export function describeFinding(f: Finding): string {
  return `${f.disk}${f.id ? ` backup ${f.id}` : ''}: ${f.problem}`;
}
