/**
 * Typed wrappers for the QMP commands live backup uses. Argument names are
 * QEMU 7.2's QAPI (qapi/block-core.json, block-export.json), each one tried
 * against qemu-storage-daemon 7.2 in test/qmp.test.ts. Answers are turned to
 * camelCase, and optional flags QEMU leaves out become false.
 */
import type { QmpClient } from './QmpClient.js';

/** A bitmap by name on the node at hand, or on any node. */
export type BitmapRef = string | { node: string; name: string };

export interface DirtyBitmapInfo {
  name: string;
  /** Enabled: tracking writes. */
  recording: boolean;
  persistent: boolean;
  /** Left by an unclean stop: it missed writes and must not be trusted. */
  inconsistent: boolean;
  /** In use by an export or a job: cannot be changed or removed. */
  busy: boolean;
  /** Bytes per bit. */
  granularity: number;
  /** Dirty bytes. */
  count: number;
}

export interface BlockNodeInfo {
  nodeName: string;
  drv: string;
  /** The image's file name as QEMU describes it (a `json:{…}` string for filters), not the child node. */
  file: string;
  readOnly: boolean;
  virtualSize: number;
  dirtyBitmaps: DirtyBitmapInfo[];
}

export interface BlockExportInfo {
  id: string;
  type: string;
  nodeName: string;
  /** Deleted, waiting for its clients to go. */
  shuttingDown: boolean;
}

/** blockdev-add's options: a driver, a node name, and the driver's own fields in QAPI spelling. */
export interface BlockdevOptions {
  driver: string;
  'node-name': string;
  [option: string]: unknown;
}

export interface NbdExportOptions {
  type: 'nbd';
  id: string;
  nodeName: string;
  /** The NBD export name; defaults to the node name. */
  name?: string;
  writable: boolean;
  /** Offered as `qemu:dirty-bitmap:<name>` meta contexts; must be disabled on a read-only export. */
  bitmaps?: readonly BitmapRef[];
}

interface RawBitmap extends Omit<DirtyBitmapInfo, 'inconsistent'> {
  inconsistent?: boolean;
}

interface RawNode {
  'node-name': string;
  drv: string;
  file: string;
  ro: boolean;
  image: { 'virtual-size': number };
  'dirty-bitmaps'?: RawBitmap[];
}

/** Every named node; `flat` leaves out the backing chain of each image, which we don't read. */
export async function queryNamedBlockNodes(qmp: QmpClient): Promise<BlockNodeInfo[]> {
  const nodes = await qmp.execute<RawNode[]>('query-named-block-nodes', { flat: true });
  return nodes.map((n) => ({
    nodeName: n['node-name'],
    drv: n.drv,
    file: n.file,
    readOnly: n.ro,
    virtualSize: n.image['virtual-size'],
    dirtyBitmaps: (n['dirty-bitmaps'] ?? []).map((b) => ({ ...b, inconsistent: b.inconsistent ?? false })),
  }));
}

export async function queryBlockExports(qmp: QmpClient): Promise<BlockExportInfo[]> {
  const exports = await qmp.execute<Array<{ id: string; type: string; 'node-name': string; 'shutting-down': boolean }>>('query-block-exports');
  return exports.map((e) => ({ id: e.id, type: e.type, nodeName: e['node-name'], shuttingDown: e['shutting-down'] }));
}

export async function queryVersion(qmp: QmpClient): Promise<{ major: number; minor: number; micro: number; package: string }> {
  const v = await qmp.execute<{ qemu: { major: number; minor: number; micro: number }; package: string }>('query-version');
  return { ...v.qemu, package: v.package };
}

/** A new bitmap, recording unless `disabled`; `persistent` (stored in the image at a clean stop) needs qcow2. */
export async function blockDirtyBitmapAdd(qmp: QmpClient, b: { node: string; name: string; persistent: boolean; disabled?: boolean; granularity?: number }): Promise<void> {
  await qmp.execute('block-dirty-bitmap-add', b);
}

export async function blockDirtyBitmapRemove(qmp: QmpClient, node: string, name: string): Promise<void> {
  await qmp.execute('block-dirty-bitmap-remove', { node, name });
}

export async function blockDirtyBitmapDisable(qmp: QmpClient, node: string, name: string): Promise<void> {
  await qmp.execute('block-dirty-bitmap-disable', { node, name });
}

export async function blockDirtyBitmapEnable(qmp: QmpClient, node: string, name: string): Promise<void> {
  await qmp.execute('block-dirty-bitmap-enable', { node, name });
}

/** OR `bitmaps` into `target` on `node`. */
export async function blockDirtyBitmapMerge(qmp: QmpClient, m: { node: string; target: string; bitmaps: readonly BitmapRef[] }): Promise<void> {
  await qmp.execute('block-dirty-bitmap-merge', m);
}

/** A QMP `transaction` action (block-dirty-bitmap-add, -disable, …). */
export type TransactionAction = { type: string; data: Record<string, unknown> };

/** Several actions at once, all or none, in one round trip (nothing to do for none). */
export async function transaction(qmp: QmpClient, actions: readonly TransactionAction[]): Promise<void> {
  if (actions.length > 0) await qmp.execute('transaction', { actions });
}

export async function blockdevAdd(qmp: QmpClient, options: BlockdevOptions): Promise<void> {
  await qmp.execute('blockdev-add', options);
}

/** Remove a node nothing uses any more (no parent, no export, no job). */
export async function blockdevDel(qmp: QmpClient, nodeName: string): Promise<void> {
  await qmp.execute('blockdev-del', { 'node-name': nodeName });
}

/** Reopen nodes with new options, e.g. another `file` child: give every option the node should keep. */
export async function blockdevReopen(qmp: QmpClient, options: readonly BlockdevOptions[]): Promise<void> {
  await qmp.execute('blockdev-reopen', { options });
}

/** A QOM property's value (a disk device's `drive`: the node it uses). */
export async function qomGet<T = unknown>(qmp: QmpClient, path: string, property: string): Promise<T> {
  return qmp.execute<T>('qom-get', { path, property });
}

/** A VM's block devices: the QOM path of each (`qdev`) and the node it uses, if a medium is in. */
export async function queryBlock(qmp: QmpClient): Promise<Array<{ qdev: string | null; nodeName: string | null }>> {
  const devices = await qmp.execute<Array<{ qdev?: string; inserted?: { 'node-name'?: string } }>>('query-block');
  return devices.map((d) => ({ qdev: d.qdev ?? null, nodeName: d.inserted?.['node-name'] ?? null }));
}

/** Set a QOM property: in a VM, a disk device's `drive`, to put a filter node into the guest's path. */
export async function qomSet(qmp: QmpClient, path: string, property: string, value: unknown): Promise<void> {
  await qmp.execute('qom-set', { path, property, value });
}

export async function blockExportAdd(qmp: QmpClient, e: NbdExportOptions): Promise<void> {
  const args: Record<string, unknown> = { type: e.type, id: e.id, 'node-name': e.nodeName, writable: e.writable };
  if (e.name !== undefined) args.name = e.name;
  if (e.bitmaps !== undefined) args.bitmaps = e.bitmaps;
  await qmp.execute('block-export-add', args);
}

/**
 * Delete an export and wait until it is gone (BLOCK_EXPORT_DELETED), so its
 * node can be deleted next. `safe` refuses while clients are connected;
 * `hard` drops them.
 */
export async function blockExportDel(qmp: QmpClient, id: string, mode: 'safe' | 'hard' = 'safe'): Promise<void> {
  // Listening first: QEMU sends the event before the reply when no client is connected.
  const deleted = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (e) => e.data.id === id);
  try {
    await qmp.execute('block-export-del', { id, mode });
  } catch (err) {
    deleted.cancel();
    throw err;
  }
  await deleted;
}

/**
 * Start QEMU's NBD server on a Unix socket. Its `addr` is the legacy socket
 * address form, unlike the command line's: `{type, data: {path}}`.
 */
export async function nbdServerStart(qmp: QmpClient, socketPath: string): Promise<void> {
  await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: socketPath } } });
}

/** Stop the NBD server; this deletes every NBD export, the guest's too if it is one. */
export async function nbdServerStop(qmp: QmpClient): Promise<void> {
  await qmp.execute('nbd-server-stop');
}
