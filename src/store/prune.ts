import { rm } from 'node:fs/promises';
import { fsyncDirectory, removeQuietly } from '../util/fsync.js';
import { withDiskLock } from './lock.js';
import { completePendingMerge, mergeForward } from './merge.js';
import type { BackupMetadata, Repository } from './repository.js';
import { type RetentionPolicy, selectRetention } from './retention.js';

export interface PruneOptions {
  policy: RetentionPolicy;
  /** At most this many merges in this run; backups needing more stay for the next run. */
  maxMerges?: number;
  dryRun?: boolean;
}

export interface PruneReport {
  kept: string[];
  removed: string[];
  merged: number;
  /** Backups the policy removes but that wait for a later run (--max-merges). */
  deferred: string[];
}

/** Remove a backup nothing depends on: metadata first (it stops being listed), then its files. */
async function deleteBackup(repo: Repository, meta: BackupMetadata): Promise<void> {
  await rm(repo.metadataPath(meta.disk, meta.id), { force: true });
  await fsyncDirectory(repo.diskDir(meta.disk));
  await removeQuietly(repo.dataPath(meta.disk, meta.id, meta.layout));
  await rm(repo.digestsPath(meta.disk, meta.id), { force: true });
}

async function pruneDisk(repo: Repository, disk: string, options: PruneOptions, report: PruneReport): Promise<void> {
  const backups = await repo.backups(disk);
  const { kept, removed } = selectRetention(backups, options.policy);
  // The chain as it will be after each step (merges re-parent children), simulated for --dry-run.
  const byId = new Map(backups.map((b) => [b.id, { ...b }]));
  const childOf = (id: string) => [...byId.values()].find((b) => b.parent === id);
  const keptIds = new Set(kept.map((b) => b.id));
  const hasKeptDescendant = (id: string): boolean => {
    for (let c = childOf(id); c; c = childOf(c.id)) if (keptIds.has(c.id)) return true;
    return false;
  };
  // A removed backup nothing kept depends on is deleted, not merged: newest first,
  // so no listed backup ever loses its parent.
  const dead = removed.filter((r) => !hasKeptDescendant(r.id)).reverse();
  for (const r of dead) {
    if (!options.dryRun) await deleteBackup(repo, byId.get(r.id)!);
    byId.delete(r.id);
    report.removed.push(r.id);
  }
  let merges = 0;
  const deferred: string[] = [];
  for (const r of removed.filter((x) => byId.has(x.id))) {
    const current = byId.get(r.id)!;
    const child = childOf(r.id)!; // it has a kept descendant
    if (options.maxMerges !== undefined && merges >= options.maxMerges) {
      deferred.push(r.id);
      continue;
    }
    if (!options.dryRun) await mergeForward(repo, current, child);
    // The child now stands where `current` stood: same parent, same kind.
    child.parent = current.parent;
    child.kind = current.kind;
    byId.delete(r.id);
    merges++;
    report.removed.push(r.id);
  }
  report.merged += merges;
  report.deferred.push(...deferred);
  report.kept.push(...kept.map((b) => b.id), ...deferred);
}

/**
 * Apply a retention policy to one disk or all: backups not kept are removed;
 * one with a descendant is merged forward into it (see merge.ts). Holds each
 * disk's lock; finishes any interrupted merge first.
 */
export async function prune(repo: Repository, disk: string | undefined, options: PruneOptions): Promise<PruneReport> {
  const report: PruneReport = { kept: [], removed: [], merged: 0, deferred: [] };
  for (const d of disk ? [disk] : await repo.disks()) {
    if (options.dryRun) {
      await pruneDisk(repo, d, options, report);
      continue;
    }
    await withDiskLock(repo.diskDir(d), 'prune', async () => {
      await completePendingMerge(repo, d);
      await repo.cleanLeftovers(d);
      await pruneDisk(repo, d, options, report);
    });
  }
  report.kept.sort();
  report.removed.sort();
  return report;
}
