/**
 * Retention of VM backups as units: the policy chooses among a VM's records
 * (vmRecord.ts), never among one disk's backups. A record not kept is removed
 * before any of its disks' backups (prune.ts then removes or merges those),
 * so no record ever names a backup that is gone; a kept record's backups are
 * all kept, so no VM backup loses a disk.
 */
import type { BackupMetadata, Repository } from './repository.js';
import { type RetentionPolicy, selectRetention } from './retention.js';
import { removeVmRecord, vmDiskName, vmNames, vmRecords } from './vmRecord.js';

/** How one disk of a VM chooses its backups: by the VM's records. */
export interface VmDiskSelection {
  select(backups: BackupMetadata[]): { kept: BackupMetadata[]; removed: BackupMetadata[] };
}

/** What the policy did to one VM's records. */
export interface VmRetained {
  vm: string;
  kept: string[];
  removed: string[];
}

/**
 * Apply the policy to the records of every VM (or of the VM `disk` belongs
 * to), removing those not kept unless it is a dry run; returns how each of
 * their disks selects its backups.
 */
export async function pruneVmRecords(repo: Repository, disk: string | undefined, options: { policy: RetentionPolicy; dryRun?: boolean }): Promise<{ selections: Map<string, VmDiskSelection>; vms: VmRetained[] }> {
  const selections = new Map<string, VmDiskSelection>();
  const retained: VmRetained[] = [];
  const all = await vmNames(repo);
  const vms = disk === undefined ? all : all.filter((vm) => disk.startsWith(`${vm}.`));
  for (const vm of vms) {
    const records = await vmRecords(repo, vm);
    if (records.length === 0) continue;
    const { kept, removed } = selectRetention(records, options.policy);
    if (!options.dryRun) for (const r of removed) await removeVmRecord(repo, vm, r.id);
    retained.push({ vm, kept: kept.map((r) => r.id), removed: removed.map((r) => r.id) });
    const targets = new Set(records.flatMap((r) => Object.keys(r.disks)));
    for (const target of targets) {
      const keep = new Set(kept.flatMap((r) => (r.disks[target] ? [r.disks[target]] : [])));
      const named = new Set(records.flatMap((r) => (r.disks[target] ? [r.disks[target]] : [])));
      selections.set(vmDiskName(vm, target), { select: (backups) => selectByRecords(backups, keep, named) });
    }
  }
  return { selections, vms: retained };
}

/**
 * A VM disk's backups: those kept records name stay; so does anything newer
 * than every record (a VM backup still being taken writes its record last)
 * and the newest. The rest — named by removed records, or left by a VM
 * backup that failed part-way — go.
 */
function selectByRecords(backups: BackupMetadata[], keep: Set<string>, named: Set<string>): { kept: BackupMetadata[]; removed: BackupMetadata[] } {
  const newestNamed = backups.filter((b) => named.has(b.id)).at(-1)?.id ?? '';
  const newest = backups.at(-1)?.id;
  const stays = (b: BackupMetadata) => keep.has(b.id) || b.id > newestNamed || b.id === newest;
  return { kept: backups.filter(stays), removed: backups.filter((b) => !stays(b)) };
}
