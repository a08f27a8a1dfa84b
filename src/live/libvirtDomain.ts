/**
 * A libvirt domain as a backup sees it: its disks (qcow2 ones can carry
 * checkpoints), whether it has a guest agent channel, its checkpoints, and
 * pausing it (a point in time without an agent: no write lands while paused).
 */
import { VaultError } from '../util/errors.js';
import { attribute, element, elements, text } from './libvirtXml.js';
import { virsh, VirshError } from './virsh.js';

/** The name QEMU and libvirt give the guest agent's virtio-serial port. */
export const AGENT_CHANNEL = 'org.qemu.guest_agent.0';

export interface DomainDisk {
  /** The device in the guest: vda, sdb, … (libvirt's name for the disk everywhere). */
  target: string;
  /** The image's path on the host. */
  source: string;
  /** The image's format: qcow2, raw, … */
  driver: string;
}

export interface DomainInfo {
  name: string;
  uuid: string;
  /** As virsh domstate says it: running, paused, shut off, … */
  state: string;
  /** The live definition (of a running domain) or the persistent one. */
  xml: string;
  /** File-backed disks only (no CD-ROMs, no network volumes). */
  disks: DomainDisk[];
  /** It has the guest agent's channel (whether an agent answers on it is another matter). */
  agent: boolean;
}

/** What a domain's errors name. */
export const domainSubject = (domain: string) => `domain "${domain}"`;

/** `virsh` on `domain`: its errors name the domain; one that is not there is said so plainly. */
export async function onDomain(connect: string, domain: string, args: string[], timeoutMs?: number): Promise<string> {
  try {
    return await virsh(connect, args, { subject: domainSubject(domain), timeoutMs });
  } catch (err) {
    if (err instanceof VirshError && /failed to get domain|Domain not found/i.test(err.said)) throw new VaultError(domainSubject(domain), `does not exist on ${connect}`);
    throw err;
  }
}

export async function domainInfo(connect: string, domain: string): Promise<DomainInfo> {
  const xml = await onDomain(connect, domain, ['dumpxml', domain]);
  const state = (await onDomain(connect, domain, ['domstate', domain])).trim();
  const devices = element(xml, 'devices') ?? '';
  return {
    name: text(xml, 'name') ?? domain,
    uuid: text(xml, 'uuid') ?? '',
    state,
    xml,
    disks: elements(devices, 'disk').flatMap(fileDisk),
    agent: elements(devices, 'channel').some((c) => attribute(element(c, 'target') ?? '', 'name') === AGENT_CHANNEL),
  };
}

/** A `<disk type='file' device='disk'>` as a DomainDisk; other disks are not backed up. */
function fileDisk(disk: string): DomainDisk[] {
  if (attribute(disk, 'type') !== 'file' || (attribute(disk, 'device') ?? 'disk') !== 'disk') return [];
  const target = attribute(element(disk, 'target') ?? '', 'dev');
  const source = attribute(element(disk, 'source') ?? '', 'file');
  if (target === null || source === null) return [];
  return [{ target, source, driver: attribute(element(disk, 'driver') ?? '', 'type') ?? 'raw' }];
}

/** The domain's checkpoints, oldest first (parents before children). */
export async function checkpoints(connect: string, domain: string): Promise<string[]> {
  const out = await onDomain(connect, domain, ['checkpoint-list', domain, '--name', '--topological']);
  return out.split('\n').map((l) => l.trim()).filter(Boolean);
}

/** Deletes one checkpoint (its bitmaps go; libvirt merges them into the parent's, so no write is lost for older ones). */
export async function deleteCheckpoint(connect: string, domain: string, name: string): Promise<void> {
  await onDomain(connect, domain, ['checkpoint-delete', domain, name]);
}

/** Pauses the guest's CPUs: its disks hold still until resume. */
export async function suspend(connect: string, domain: string): Promise<void> {
  await onDomain(connect, domain, ['suspend', domain]);
}

export async function resume(connect: string, domain: string): Promise<void> {
  await onDomain(connect, domain, ['resume', domain]);
}
