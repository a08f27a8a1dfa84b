/**
 * VM backups (docs/design/11-whole-vm-backups.md): one record per backup of a
 * virtual machine, `vms/<vm>/<id>.json`, naming one backup of each of its
 * disks — all taken at the same instant — and the VM's definition. Each disk
 * is an ordinary repository disk, `<vm>.<target>`, so list, restore, serve,
 * verify and replicate work on it as on any disk. The record is written last,
 * once every disk's backup is committed: a VM backup exists only whole.
 */
import { key } from '../storage/Storage.js';
import { isNotFound } from '../storage/Storage.js';
import { VaultError } from '../util/errors.js';
import { nearest } from '../util/suggest.js';
import { parseJson, sealedText, sealHolds } from './metadata.js';
import { checkBackupId, checkDiskName, isBackupId } from './names.js';
import type { Repository } from './repository.js';

const VMS_DIR = 'vms';

/** What QEMU tells of a VM over QMP: enough to boot its disks again. */
export interface QemuDefinition {
  kind: 'qemu';
  /** The machine type (`pc-q35-7.2`). */
  machine: string | null;
  memoryMiB: number | null;
  cpus: number | null;
  /** Direct kernel boot, when the VM was started with -kernel (QEMU's machine properties). */
  kernel: string | null;
  initrd: string | null;
  append: string | null;
  /** Each disk: its device id (the target), its block node, format and virtual size. */
  disks: Array<{ target: string; node: string; format: string; size: number; file: string | null }>;
  /** Whether the VM has a guest agent channel (a virtserialport named org.qemu.guest_agent.0). */
  agent: boolean;
}

/** A libvirt domain's XML, as `virsh dumpxml` gave it at the backup. */
export interface LibvirtDefinition {
  kind: 'libvirt';
  domain: string;
  uuid: string;
  xml: string;
}

export type VmDefinition = QemuDefinition | LibvirtDefinition;

export interface VmRecord {
  format: 1;
  vm: string;
  id: string;
  createdAt: string;
  /** Each disk's target (libvirt's vda, or QEMU's device id) and the backup of `<vm>.<target>` taken with the others. */
  disks: Record<string, string>;
  /** Whether the guest's filesystems were frozen through its agent at the point in time. */
  quiesced: boolean;
  frozenMs: number | null;
  /** How long the VM was paused instead, when it could not be frozen. */
  pausedMs: number | null;
  /** libvirt: the checkpoint that starts at this backup's point in time (the next backup's delta reads from it). */
  checkpoint: string | null;
  definition: VmDefinition;
  sealSha256?: string;
}

/** A disk's target (libvirt's vda, a QEMU device id) becomes part of a disk name: letters, digits, '_' and '-'. */
export const isVmTarget = (target: string): boolean => /^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$/.test(target);

/** The repository disk holding a VM's disk. */
export function vmDiskName(vm: string, target: string): string {
  return checkDiskName(`${checkVmName(vm)}.${target}`);
}

/** VM names become a folder and a disk-name prefix: the disk-name rules, and no '.', which separates the target. */
export function checkVmName(vm: string): string {
  checkDiskName(vm);
  if (vm.includes('.')) throw new VaultError(vm, "invalid VM name: '.' separates a VM's name from its disks' targets in disk names; use letters, digits, '_' or '-'");
  return vm;
}

const vmKey = (vm: string) => key(VMS_DIR, checkVmName(vm));
const recordKey = (vm: string, id: string) => key(vmKey(vm), `${checkBackupId(id)}.json`);

/** The VMs that have backups. */
export async function vmNames(repo: Repository): Promise<string[]> {
  return (await repo.storage.list(VMS_DIR)).filter((name) => !name.startsWith('.'));
}

/** A VM's backups, oldest first. */
export async function vmRecords(repo: Repository, vm: string): Promise<VmRecord[]> {
  const out: VmRecord[] = [];
  for (const name of await repo.storage.list(vmKey(vm))) {
    const id = name.replace(/\.json$/, '');
    if (!name.endsWith('.json') || !isBackupId(id)) continue;
    const record = await readVmRecord(repo, vm, id).catch((err: unknown) => {
      // Removed since the listing (a prune): not a VM backup any more.
      if (isNotFound(err)) return null;
      throw err;
    });
    if (record) out.push(record);
  }
  return out.sort((a, b) => (a.id < b.id ? -1 : 1));
}

export async function readVmRecord(repo: Repository, vm: string, id: string): Promise<VmRecord> {
  const k = recordKey(vm, id);
  const where = repo.storage.describe(k);
  return parseVmRecord(parseJson(await repo.storage.get(k), where), where, vm, id);
}

/** The VM backup `id`, or the newest; a clear line when there is none. */
export async function findVmRecord(repo: Repository, vm: string, id?: string): Promise<VmRecord> {
  if (id !== undefined) {
    return readVmRecord(repo, vm, id).catch((err: unknown) => {
      if (isNotFound(err)) throw new VaultError(repo.root, `VM "${vm}" has no backup ${id} (vhdvault vm list ${repo.root} ${vm} lists them)`);
      throw err;
    });
  }
  const newest = (await vmRecords(repo, vm)).at(-1);
  if (!newest) throw await noSuchVm(repo, vm);
  return newest;
}

/** "has no backup of VM X", with the VM probably meant: what every vm command says of a VM never backed up. */
export async function noSuchVm(repo: Repository, vm: string): Promise<VaultError> {
  const near = nearest(vm, (await vmNames(repo)).filter((v) => v !== vm));
  return new VaultError(repo.root, `has no backup of VM "${vm}"${near ? ` (did you mean ${near}?)` : ''}`);
}

/** Written last, after every disk's backup is committed: durable and whole (readers see it or nothing). */
export async function writeVmRecord(repo: Repository, record: VmRecord): Promise<void> {
  await repo.storage.put(recordKey(record.vm, record.id), sealedText(record));
}

/** Removed first, before any of its disks' backups: no record ever names a disk backup that is gone. */
export async function removeVmRecord(repo: Repository, vm: string, id: string): Promise<void> {
  await repo.storage.delete(recordKey(vm, id));
}

function parseVmRecord(value: unknown, where: string, vm: string, id: string): VmRecord {
  const r = value as Partial<VmRecord> | null;
  const disks = r?.disks;
  const ok =
    r !== null &&
    typeof r === 'object' &&
    r.format === 1 &&
    r.vm === vm &&
    r.id === id &&
    typeof r.createdAt === 'string' &&
    typeof disks === 'object' &&
    disks !== null &&
    Object.keys(disks).length > 0 &&
    Object.entries(disks).every(([target, backup]) => isVmTarget(target) && typeof backup === 'string' && isBackupId(backup)) &&
    typeof r.quiesced === 'boolean' &&
    typeof r.definition === 'object' &&
    r.definition !== null &&
    (r.definition.kind === 'qemu' || r.definition.kind === 'libvirt');
  if (!ok) throw new VaultError(where, 'is not a valid VM backup record');
  if (!sealHolds(r)) throw new VaultError(where, 'has been edited or damaged: its fields no longer match the SHA-256 sealed in it');
  return r as VmRecord;
}
