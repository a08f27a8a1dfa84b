import { VaultError } from '../util/errors.js';
import { withExclusiveAccess } from './access.js';
import { diskFindings, type Finding } from './inspect.js';
import { type DiskLock, withDiskLock } from './lock.js';
import { completePendingMerge, hasPendingMerge, mergeForward } from './merge.js';
import type { BackupMetadata, Repository } from './repository.js';
import { pinnedBackups } from './overlayPins.js';
import { replicaPinnedBackups } from './replicaPins.js';
import { ensureReserve, withReserve } from './reserve.js';
import { type RetentionPolicy, selectRetention } from './retention.js';
import { pruneVmRecords, type VmDiskSelection, type VmRetained } from './vmRetention.js';

export interface PruneOptions {
  policy: RetentionPolicy;
  /** At most this many merges in this run; backups needing more stay for the next run. */
  maxMerges?: number;
  dryRun?: boolean;
  /** Told when prune has to wait for readers of a disk to finish. */
  onWait?: (message: string) => void;
  /** Told of files that belong to no backup (reported, never removed). */
  onFinding?: (finding: Finding) => void;
  /** Told, after each disk, what was done to it (or, refused, what was done before the refusal). */
  onDisk?: (disk: string, report: PruneReport) => void;
}

export interface PruneReport {
  kept: string[];
  removed: string[];
  merged: number;
  /** Each merge (done, or with --dry-run to be done): the removed backup and the kept one it is folded into. */
  merges: Array<{ removed: string; into: string }>;
  /** Backups the policy removes but that wait for a later run (--max-merges). */
  deferred: string[];
  /** Disks left untouched, each with why (a broken chain, a damaged journal, a lock held): the other disks are pruned. */
  refused: Array<{ disk: string; problem: string }>;
  /** Objects layout: block objects no block map names any more (removed backups', killed backups' uploads), deleted. */
  collected: { objects: number };
  /** VM backups (vmRecord.ts), kept or removed as units: the policy applies to them, and their disks follow. */
  vms: VmRetained[];
}

/** What prune will do to one disk, worked out before anything changes. */
interface Plan {
  kept: BackupMetadata[];
  /** Removed backups nothing kept depends on: deleted, newest first. */
  deletions: BackupMetadata[];
  /** Removed backups folded into their child, oldest first (each child standing in its parent's place for the next). */
  merges: Array<{ parent: BackupMetadata; child: BackupMetadata }>;
  deferred: BackupMetadata[];
}

function plan(backups: BackupMetadata[], options: PruneOptions, pinned: Map<string, string> = new Map(), vm?: VmDiskSelection): Plan {
  const selected = vm ? vm.select(backups) : selectRetention(backups, options.policy);
  // A pinned backup stays (see pins()).
  for (const r of selected.removed.filter((b) => pinned.has(b.id))) {
    selected.removed.splice(selected.removed.indexOf(r), 1);
    selected.kept.push(r);
    options.onFinding?.({ disk: r.disk, id: r.id, kind: 'structure', problem: `kept although the policy removes it: ${pinned.get(r.id)}` });
  }
  // The chains as they will be after each step (merges re-parent children).
  const byId = new Map(backups.map((b) => [b.id, { ...b }]));
  const childrenOf = (id: string) => [...byId.values()].filter((b) => b.parent === id);
  const keptIds = new Set(selected.kept.map((b) => b.id));
  // A backup may have several children (a fork: its metadata put back after a newer chain began).
  const hasKeptDescendant = (id: string): boolean => childrenOf(id).some((c) => keptIds.has(c.id) || hasKeptDescendant(c.id));
  // A removed backup nothing kept depends on is deleted, not merged: newest first,
  // so no listed backup ever loses its parent.
  const deletions = selected.removed.filter((r) => !hasKeptDescendant(r.id)).reverse().map((r) => byId.get(r.id)!);
  for (const d of deletions) byId.delete(d.id);
  const kept = [...selected.kept];
  const merges: Plan['merges'] = [];
  const deferred: BackupMetadata[] = [];
  for (const r of selected.removed.filter((x) => byId.has(x.id))) {
    const children = childrenOf(r.id); // each has a kept descendant: the dead ones are gone
    if (children.length !== 1) {
      // Folding one backup into two children is not a merge: it stays, and says why.
      kept.push(r);
      options.onFinding?.({ disk: r.disk, id: r.id, kind: 'structure', problem: `kept although the policy removes it: ${children.length} kept backups depend on it through different children` });
      continue;
    }
    if (options.maxMerges !== undefined && merges.length >= options.maxMerges) {
      deferred.push(r);
      continue;
    }
    const parent = byId.get(r.id)!;
    const child = children[0]!;
    merges.push({ parent: { ...parent }, child: { ...child } });
    // The child now stands where the parent stood: same parent, same kind.
    child.parent = parent.parent;
    child.kind = parent.kind;
    byId.delete(r.id);
  }
  kept.sort((a, b) => (a.id < b.id ? -1 : 1));
  return { kept, deletions, merges, deferred };
}

/**
 * Refuse to touch a disk whose chains are not sound: a merge or deletion over a
 * broken chain can turn a damaged backup into a lost one. Files that belong to no
 * backup are only reported (prune leaves them alone).
 */
async function checkStructure(repo: Repository, disk: string, options: PruneOptions): Promise<BackupMetadata[]> {
  const unreadable: Finding[] = [];
  const backups = await repo.backups(disk, (err) => unreadable.push({ disk, id: null, kind: 'metadata', problem: err.message }));
  const findings = [...unreadable, ...(await diskFindings(repo, disk, backups))];
  const blocking = [...unreadable, ...findings.filter((f) => f.id !== null)];
  for (const f of findings) if (f.id === null && !unreadable.includes(f)) options.onFinding?.(f);
  if (blocking.length > 0) {
    const first = blocking[0]!;
    const more = blocking.length > 1 ? ` (and ${blocking.length - 1} more: see vhdvault verify)` : '';
    throw new VaultError(repo.diskDir(disk), `prune refused, nothing changed: ${first.id ? `backup ${first.id}: ` : ''}${first.problem}${more}`);
  }
  return backups;
}

/**
 * Each deletion and merge starts only while the lock is still ours (each, once started, is
 * finished by whoever comes next), and is added to `done` once finished: a later step's failure must not hide them.
 */
async function applyPlan(repo: Repository, p: Plan, lock: DiskLock, done: Plan): Promise<void> {
  for (const d of p.deletions) {
    await lock.confirm();
    await repo.deleteBackup(d);
    done.deletions.push(d);
  }
  for (const m of p.merges) {
    await lock.confirm();
    await mergeForward(repo, m.parent, m.child);
    done.merges.push(m);
  }
}

function record(report: PruneReport, p: Plan): void {
  report.removed.push(...p.deletions.map((d) => d.id), ...p.merges.map((m) => m.parent.id));
  report.merged += p.merges.length;
  report.merges.push(...p.merges.map((m) => ({ removed: m.parent.id, into: m.child.id })));
  report.deferred.push(...p.deferred.map((d) => d.id));
  report.kept.push(...p.kept.map((b) => b.id), ...p.deferred.map((d) => d.id));
}

/**
 * Backups kept whatever the policy, each with why: an overlay's writes are
 * restorable only over its backup, and a replication's next delta builds on
 * the newest backup it sent (replicaPins.ts).
 */
async function pins(repo: Repository, disk: string, options: { dryRun?: boolean } = {}): Promise<Map<string, string>> {
  const why = new Map<string, string>();
  for (const [id, dir] of await pinnedBackups(repo, disk, options)) why.set(id, `the overlay ${dir} sits on it (restore --from-overlay, then remove the folder, to let it go)`);
  for (const [id, destination] of await replicaPinnedBackups(repo, disk, options)) {
    const replica = `it is the newest backup replicated to ${destination}, which the next replication builds on`;
    why.set(id, why.has(id) ? `${why.get(id)}; ${replica}` : replica);
  }
  return why;
}

async function pruneDisk(repo: Repository, disk: string, options: PruneOptions, report: PruneReport, vm?: VmDiskSelection): Promise<void> {
  if (options.dryRun) {
    // A dry run changes nothing, so it cannot finish an interrupted merge to plan from the result.
    if (await hasPendingMerge(repo, disk)) throw new VaultError(repo.diskDir(disk), 'an interrupted merge is pending: a prune (without --dry-run), backup, list or restore finishes it first; then try the dry run again');
    record(report, plan(await checkStructure(repo, disk, options), options, await pins(repo, disk, { dryRun: true }), vm));
    return;
  }
  await withDiskLock(repo, disk, 'prune', async (lock) => {
    // Finish what an interrupted run left before judging the structure.
    if (await hasPendingMerge(repo, disk)) await withExclusiveAccess(repo, disk, lock, () => completePendingMerge(repo, disk), options);
    await repo.recoverCommits(disk);
    await repo.cleanLeftovers(disk);
    const backups = await checkStructure(repo, disk, options);
    // Each warning once, though the plan may be made twice.
    const told = new Set<string>();
    const once: PruneOptions = {
      ...options,
      onFinding: (f) => {
        const line = `${f.id} ${f.problem}`;
        if (!told.has(line)) options.onFinding?.(f);
        told.add(line);
      },
    };
    let p = plan(backups, once, await pins(repo, disk), vm);
    const removal = repo.layout.removal(repo, disk);
    if (p.deletions.length + p.merges.length > 0) {
      await withExclusiveAccess(repo, disk, lock, async () => {
        // A reader we waited for (a replication) may have moved its pin meanwhile: plan again with the pins as they are now.
        p = plan(backups, once, await pins(repo, disk), vm);
        await removal.before([...p.deletions, ...p.merges.map((m) => m.parent)]);
        const done: Plan = { kept: [], deletions: [], merges: [], deferred: [] };
        await applyPlan(repo, p, lock, done).catch((err: unknown) => {
          record(report, done);
          throw err;
        });
      }, options);
    }
    record(report, p);
    // The collection deletes objects no map names: only while no other writer can have started one.
    await lock.confirm();
    report.collected.objects += await removal.after();
  });
}

/**
 * Apply a retention policy to one disk or all: backups not kept are removed;
 * one with a descendant is merged forward into it (see merge.ts). Checks each
 * disk's chains first and refuses a disk whose chains are not sound. Holds each
 * disk's lock; finishes any interrupted merge first; waits for readers before
 * changing anything they could be reading. On a full filesystem the repository's
 * reserve is given back so that prune can still run and free space.
 */
export async function prune(repo: Repository, disk: string | undefined, options: PruneOptions): Promise<PruneReport> {
  const report: PruneReport = emptyReport();
  // VM backups first: a record goes before any backup it names, so none ever names a missing one.
  const { selections: vmDisks, vms } = await pruneVmRecords(repo, disk, options);
  report.vms = vms;
  for (const d of disk ? [disk] : await repo.disks()) {
    // A rerun after running out of space must not count the first attempt's work twice.
    let attempt = emptyReport();
    try {
      await withReserve(repo.storage, async () => {
        attempt = emptyReport();
        await pruneDisk(repo, d, options, attempt, vmDisks.get(d));
      });
    } catch (err) {
      // One disk's problem never stops the others: it is reported, and the command fails at the end.
      if (!(err instanceof VaultError)) throw err;
      report.refused.push({ disk: d, problem: err.message });
    }
    options.onDisk?.(d, attempt);
    report.kept.push(...attempt.kept);
    report.removed.push(...attempt.removed);
    report.merged += attempt.merged;
    report.merges.push(...attempt.merges);
    report.deferred.push(...attempt.deferred);
    report.collected.objects += attempt.collected.objects;
  }
  if (!options.dryRun) await ensureReserve(repo.storage);
  report.kept.sort();
  report.removed.sort();
  return report;
}

const emptyReport = (): PruneReport => ({ kept: [], removed: [], merged: 0, merges: [], deferred: [], refused: [], collected: { objects: 0 }, vms: [] });
