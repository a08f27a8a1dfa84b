/**
 * The guest's path through QEMU's block graph, and how a filter enters it.
 * Either a raw passthrough node (`--node`; how a qemu-storage-daemon export
 * is set up), whose `file` child is the disk's format node and is swapped
 * with blockdev-reopen; or, in a VM, a disk device (`--device`) whose
 * `drive` is the disk's node (`--node`) and is swapped with qom-set.
 * Children are found from x-debug-query-block-graph, since
 * query-named-block-nodes names a child by file name, not by node.
 */
import { VaultError } from '../util/errors.js';
import { blockdevReopen, qomGet, qomSet, queryBlock, queryNamedBlockNodes, type BlockNodeInfo } from '../qmp/commands.js';
import type { QmpClient } from '../qmp/QmpClient.js';

/** Every node vhdvault adds to QEMU, and every export and bitmap, is named with this. */
export const OUR_PREFIX = 'vhdvault-';

/** Where the guest's I/O enters the disk: what `--node` (and `--device`) name. */
export interface GuestEntry {
  node: string;
  device?: string;
}

export interface GuestPath {
  entry: GuestEntry;
  /** The disk's format node (qcow2 or raw): the filter's `file`, the bitmaps' node. */
  disk: BlockNodeInfo;
}

interface Graph {
  nodes: Array<{ id: number; type: string; name: string }>;
  edges: Array<{ parent: number; child: number; name: string }>;
}

/** The node name of `parent`'s `file` child, or null. */
export async function fileChild(qmp: QmpClient, parent: string): Promise<string | null> {
  const graph = await qmp.execute<Graph>('x-debug-query-block-graph');
  const p = graph.nodes.find((n) => n.type === 'block-driver' && n.name === parent);
  const edge = p && graph.edges.find((e) => e.parent === p.id && e.name === 'file');
  return (edge && graph.nodes.find((n) => n.id === edge.child)?.name) || null;
}

const devicePath = (device: string) => `/machine/peripheral/${device}`;

/** The node the guest reads through now, right above the disk: the passthrough node's child, or the device's drive. */
export async function guestNode(qmp: QmpClient, entry: GuestEntry): Promise<string | null> {
  if (entry.device === undefined) return fileChild(qmp, entry.node);
  const path = devicePath(entry.device);
  // A device's `qdev` is its path, or a child of it (virtio-blk's backend).
  const found = (await queryBlock(qmp)).find((d) => d.qdev !== null && (d.qdev === path || d.qdev.startsWith(`${path}/`)));
  if (!found) throw new VaultError(qmp.socketPath, `no block device "${entry.device}" (--device names a disk device's id, e.g. -device virtio-blk-pci,id=${entry.device})`);
  return found.nodeName;
}

/** Find the guest path (once a filter a killed run left there is out: frozenView's removeLeftoverView). */
export async function findGuestPath(qmp: QmpClient, entry: GuestEntry): Promise<GuestPath> {
  const nodes = await queryNamedBlockNodes(qmp);
  const current = await guestNode(qmp, entry);
  if (current?.startsWith(OUR_PREFIX)) throw new VaultError(qmp.socketPath, `the guest still reads through "${current}", left by an earlier backup`);
  if (entry.device !== undefined) {
    const disk = nodes.find((n) => n.nodeName === entry.node);
    if (!disk) throw new VaultError(qmp.socketPath, `no block node "${entry.node}" (with --device, --node names the disk node the device uses)`);
    if (current !== entry.node) throw new VaultError(qmp.socketPath, `device "${entry.device}" uses block node "${current ?? 'none'}", not "${entry.node}" (give --node the node the device uses)`);
    return { entry, disk };
  }
  const top = nodes.find((n) => n.nodeName === entry.node);
  if (!top) throw new VaultError(qmp.socketPath, `no block node "${entry.node}" (--node names the guest's raw passthrough node, or with --device the device's disk node)`);
  if (top.drv !== 'raw') throw new VaultError(qmp.socketPath, `block node "${entry.node}" is a ${top.drv} node, not a raw passthrough node over the disk (give --node the node the guest's export uses, or --device for a VM disk)`);
  const disk = current && nodes.find((n) => n.nodeName === current);
  if (!disk) throw new VaultError(qmp.socketPath, `block node "${entry.node}" has no named file child (the disk's format node)`);
  return { entry, disk };
}

/**
 * Make the guest read through `node`: how the filter enters and leaves its
 * path. A device is set only when it uses another node now (setting the
 * node it already uses aborts QEMU 7.2), which only a `fresh` node needs no asking for.
 */
export async function attach(qmp: QmpClient, entry: GuestEntry, node: string, options: { fresh?: boolean } = {}): Promise<void> {
  if (entry.device === undefined) return blockdevReopen(qmp, [{ driver: 'raw', 'node-name': entry.node, file: node }]);
  const path = devicePath(entry.device);
  // `fresh`: a node just added, which the device cannot be using.
  if (options.fresh || (await qomGet(qmp, path, 'drive')) !== node) await qomSet(qmp, path, 'drive', node);
}
