/**
 * A running QEMU VM as QMP shows it: its disk devices (each device id is the
 * disk's target, its inserted node the one a filter goes under) and what it
 * takes to boot those disks again (machine type, memory, CPUs, a direct
 * kernel boot's files, a guest agent channel): the definition a VM backup
 * keeps.
 */
import { VaultError } from '../util/errors.js';
import { qomGet, queryNamedBlockNodes } from '../qmp/commands.js';
import type { QmpClient } from '../qmp/QmpClient.js';
import { isVmTarget, type QemuDefinition } from '../store/vmRecord.js';
import { fileChild, OUR_PREFIX } from './guestPath.js';

const PERIPHERAL = '/machine/peripheral/';
/** The virtio-serial port name qemu-ga listens on. */
const AGENT_PORT = 'org.qemu.guest_agent.0';

export interface VmDisk {
  /** The device id: the target, and the repository disk's suffix. */
  target: string;
  /** The disk node the device uses (its `drive`). */
  node: string;
}

/** Every writable disk device with a medium, or those `only` names (each must exist). */
export async function vmDisks(qmp: QmpClient, only?: string[]): Promise<VmDisk[]> {
  const devices = await qmp.execute<Array<{ qdev?: string; inserted?: { 'node-name'?: string; ro?: boolean } }>>('query-block');
  const disks: VmDisk[] = [];
  for (const d of devices) {
    if (!d.qdev?.startsWith(PERIPHERAL) || !d.inserted || d.inserted.ro) continue;
    const target = d.qdev.slice(PERIPHERAL.length).split('/')[0]!;
    let node = d.inserted['node-name'] ?? '';
    // A filter a killed backup left: the disk is the node below it (frozenView's leftover removal puts it back).
    if (node.startsWith(OUR_PREFIX)) node = (await fileChild(qmp, node)) ?? node;
    if (!isVmTarget(target)) throw new VaultError(qmp.socketPath, `disk device "${target}" has an id vhdvault cannot use as a disk name (letters, digits, '_' or '-')`);
    disks.push({ target, node });
  }
  if (only === undefined) {
    if (disks.length === 0) throw new VaultError(qmp.socketPath, 'the VM has no writable disk device with a medium');
    return disks;
  }
  return only.map((t) => {
    const found = disks.find((d) => d.target === t);
    if (!found) throw new VaultError(qmp.socketPath, `the VM has no writable disk device "${t}" (it has ${disks.map((d) => d.target).join(', ') || 'none'})`);
    return found;
  });
}

/** What QMP tells about the VM and its disks. */
export async function qemuDefinition(qmp: QmpClient, disks: VmDisk[]): Promise<QemuDefinition> {
  const nodes = await queryNamedBlockNodes(qmp);
  const machineProp = <T>(name: string) => qomGet<T>(qmp, '/machine', name).catch(() => null);
  const type = await machineProp<string>('type');
  const memory = await qmp.execute<{ 'base-memory'?: number }>('query-memory-size-summary').catch(() => null);
  const cpus = await qmp.execute<unknown[]>('query-cpus-fast').catch(() => null);
  const text = (v: unknown) => (typeof v === 'string' && v !== '' ? v : null);
  return {
    kind: 'qemu',
    machine: type ? type.replace(/-machine$/, '') : null,
    memoryMiB: memory?.['base-memory'] ? Math.round(memory['base-memory'] / 1048576) : null,
    cpus: cpus?.length ?? null,
    kernel: text(await machineProp('kernel')),
    initrd: text(await machineProp('initrd')),
    append: text(await machineProp('append')),
    disks: disks.map((d) => {
      const n = nodes.find((x) => x.nodeName === d.node);
      return { target: d.target, node: d.node, format: n?.drv ?? 'raw', size: n?.virtualSize ?? 0, file: n?.file && !n.file.startsWith('json:') ? n.file : null };
    }),
    agent: await hasAgentPort(qmp),
  };
}

/** Whether a virtserialport named for qemu-ga is among the VM's devices. */
async function hasAgentPort(qmp: QmpClient): Promise<boolean> {
  const devices = await qmp.execute<Array<{ name: string; type: string }>>('qom-list', { path: '/machine/peripheral' }).catch(() => []);
  for (const d of devices) {
    if (d.type !== 'child<virtserialport>') continue;
    if ((await qomGet(qmp, `${PERIPHERAL}${d.name}`, 'name').catch(() => null)) === AGENT_PORT) return true;
  }
  // Ports without an id live under /machine/peripheral-anon.
  const anon = await qmp.execute<Array<{ name: string; type: string }>>('qom-list', { path: '/machine/peripheral-anon' }).catch(() => []);
  for (const d of anon) {
    if (d.type !== 'child<virtserialport>') continue;
    if ((await qomGet(qmp, `/machine/peripheral-anon/${d.name}`, 'name').catch(() => null)) === AGENT_PORT) return true;
  }
  return false;
}
