/**
 * The guest's path through QEMU's block graph: the raw passthrough node
 * `--node` names (what the guest's export or device uses) and its `file`
 * child, the disk's format node, which carries the dirty bitmaps. Found from
 * x-debug-query-block-graph, since query-named-block-nodes names a child by
 * file name, not by node.
 */
import { VhdError } from '../vhd/errors.js';
import { blockdevReopen, queryNamedBlockNodes, type BlockNodeInfo } from './commands.js';
import type { QmpClient } from './QmpClient.js';

/** Every node vhdvault adds to QEMU, and every export and bitmap, is named with this. */
export const OUR_PREFIX = 'vhdvault-';

export interface GuestPath {
  /** The raw passthrough node the copy-before-write filter is put under. */
  node: string;
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

/** Find the guest path under `node` (once a filter a killed run left there is out: removeLeftoverView). */
export async function findGuestPath(qmp: QmpClient, node: string): Promise<GuestPath> {
  const nodes = await queryNamedBlockNodes(qmp);
  const top = nodes.find((n) => n.nodeName === node);
  if (!top) throw new VhdError(qmp.socketPath, `no block node "${node}" (--node names the guest's raw passthrough node)`);
  if (top.drv !== 'raw') throw new VhdError(qmp.socketPath, `block node "${node}" is a ${top.drv} node, not a raw passthrough node over the disk (give --node the node the guest's export uses)`);
  const child = await fileChild(qmp, node);
  if (child?.startsWith(OUR_PREFIX)) throw new VhdError(qmp.socketPath, `block node "${node}" still reads through "${child}", left by an earlier backup`);
  const disk = child && nodes.find((n) => n.nodeName === child);
  if (!disk) throw new VhdError(qmp.socketPath, `block node "${node}" has no named file child (the disk's format node)`);
  return { node, disk };
}

/** Make `file` the passthrough node's child: how the filter enters and leaves the guest's path. */
export async function reopenOver(qmp: QmpClient, node: string, file: string): Promise<void> {
  await blockdevReopen(qmp, [{ driver: 'raw', 'node-name': node, file }]);
}
