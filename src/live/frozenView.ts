/**
 * The frozen view of a running guest's disk (docs/design/09-live-backups.md §9.3): a copy-before-write filter put into the guest's path copies old
 * data to a target before a guest write lands; a snapshot-access node over
 * the filter, exported read-only over NBD, reads the disk as it was when the
 * filter went in. The target is a fleecing image (fleecing.ts) or vhdvault's
 * own NBD export into the backup (directTarget.ts).
 * `on-cbw-error=break-snapshot`: a copy that fails or times out fails our
 * reads, never the guest's write.
 */
import { createHash } from 'node:crypto';
import { processAlive } from '../util/processes.js';
import { QmpCommandError } from '../qmp/errors.js';
import { type NbdAddress, nbdAddress } from '../nbd/uri.js';
import { VaultError } from '../util/errors.js';
import { blockdevAdd, blockdevDel, blockExportAdd, blockExportDel, type BitmapRef, queryBlockExports, queryNamedBlockNodes } from '../qmp/commands.js';
import { attach, fileChild, type GuestEntry, guestNode, type GuestPath, OUR_PREFIX } from './guestPath.js';
import type { QemuNbdServer } from './qemuNbdServer.js';
import type { QmpClient } from '../qmp/QmpClient.js';

/**
 * What one backup of one guest adds to QEMU, named after its `--node` (by a
 * hash: node names are at most 31 characters), so that two disks of one QEMU
 * do not meet, and after the process that runs it, so that a leftover is
 * told from another backup's work in progress by its name alone: its
 * process is gone.
 */
export class ViewNames {
  /** Every name of this guest's views, whichever process made them, starts with this. */
  readonly guestPrefix: string;
  /** Every name of this process's view starts with this. */
  readonly prefix: string;
  readonly target: string;
  readonly cbw: string;
  readonly snap: string;

  constructor(guestNode: string, pid = process.pid) {
    this.guestPrefix = `${OUR_PREFIX}${createHash('sha256').update(guestNode).digest('hex').slice(0, 8)}-`;
    this.prefix = `${this.guestPrefix}${pid}-`;
    this.target = `${this.prefix}t`;
    this.cbw = `${this.prefix}c`;
    this.snap = `${this.prefix}s`;
  }

  /** The frozen view's export id and name. */
  exportOf(backupId: string): string {
    return `${this.prefix}${backupId}`;
  }

  /** The process that made `name` (a name of this guest's views), or null if the name does not say. */
  ownerOf(name: string): number | null {
    if (!name.startsWith(this.guestPrefix)) return null;
    const pid = Number(/^(\d+)-/.exec(name.slice(this.guestPrefix.length))?.[1] ?? NaN);
    return Number.isSafeInteger(pid) ? pid : null;
  }

  /** A name of this guest's views whose process is gone (or that names none): a killed run's. */
  isLeftover(name: string): boolean {
    if (!name.startsWith(this.guestPrefix)) return false;
    const pid = this.ownerOf(name);
    return pid === null || (pid !== process.pid && !processAlive(pid));
  }
}

/** A step that undoes one step of the set-up. */
export type Undo = () => Promise<void>;

/** Where the filter copies old data: adds the node `name` to QEMU, and says how to take it out again. */
export interface CopyTarget {
  add(qmp: QmpClient, name: string): Promise<Undo>;
}

/**
 * Take out what a killed run left in this guest's path, in teardown order:
 * its exports, the snapshot node, the filter out of the guest's path (the
 * guest back on the filter's own child), the filter and its target.
 */
export async function removeLeftoverView(qmp: QmpClient, entry: GuestEntry): Promise<void> {
  const names = new ViewNames(entry.node);
  const current = await guestNode(qmp, entry);
  // Another backup of this guest at work: it is not ours to take apart, and one at a time is the rule.
  const owner = current?.startsWith(OUR_PREFIX) && !names.isLeftover(current) ? names.ownerOf(current) : null;
  if (owner !== null) throw new VaultError(qmp.socketPath, `the guest of "${entry.node}" reads through "${current}", the view of a live backup running in process ${owner}: one live backup of a disk at a time`);
  for (const e of await queryBlockExports(qmp)) {
    if (names.isLeftover(e.id)) await blockExportDel(qmp, e.id, 'hard');
  }
  const leftovers = (await queryNamedBlockNodes(qmp)).map((n) => n.nodeName).filter((n) => names.isLeftover(n));
  // Teardown order: snapshots, then the filter out of the guest's path, then filters, then targets.
  const byKind = (suffix: 't' | 'c' | 's') => leftovers.filter((n) => n.endsWith(`-${suffix}`));
  for (const node of byKind('s')) await blockdevDel(qmp, node);
  if (current?.startsWith(OUR_PREFIX)) {
    const disk = await fileChild(qmp, current);
    if (!disk) throw new VaultError(qmp.socketPath, `block node "${current}" left by an earlier backup has no file child`);
    await attach(qmp, entry, disk);
  }
  for (const node of [...byKind('c'), ...byKind('t')]) await blockdevDel(qmp, node);
}

export interface FrozenViewOptions {
  /** The backup's id: names the export. */
  id: string;
  /** Seconds a copy may take before the snapshot breaks (and the backup with it). */
  cbwTimeout: number;
  server: QemuNbdServer;
}

export class FrozenView {
  readonly names: ViewNames;
  readonly exportName: string;
  private readonly undo: Undo[] = [];
  private unexport: Promise<void> | null = null;
  private exported = false;

  constructor(
    private readonly qmp: QmpClient,
    private readonly guest: GuestPath,
    private readonly options: FrozenViewOptions,
  ) {
    this.names = new ViewNames(guest.entry.node);
    this.exportName = this.names.exportOf(options.id);
    // Last in teardown: by then our export is gone.
    this.undo.push(() => options.server.release());
  }

  /**
   * The copy target and the filter, added beside the guest's path, before the
   * point in time (outside the window a frozen or paused guest waits through):
   * until insert(), the guest's writes do not pass the filter, and what they
   * change is what the view shows. Anything set up before a failure is undone by teardown().
   */
  async prepare(target: CopyTarget): Promise<void> {
    const { qmp, guest, names } = this;
    this.undo.push(await target.add(qmp, names.target));
    // No `bitmap`: the whole disk is protected, so a write during the bitmap hand-over is never lost.
    await blockdevAdd(qmp, { driver: 'copy-before-write', 'node-name': names.cbw, file: guest.disk.nodeName, target: names.target, 'on-cbw-error': 'break-snapshot', 'cbw-timeout': this.options.cbwTimeout });
    this.undo.push(() => blockdevDel(qmp, names.cbw));
  }

  /** The point in time: the filter enters the guest's path; from now on a write first copies what it overwrites. */
  async insert(): Promise<void> {
    const { qmp, guest, names } = this;
    this.undo.push(() => attach(qmp, guest.entry, guest.disk.nodeName)); // before attaching: a failed attach may have half-happened
    // The filter is new: the guest cannot be using it yet, so no need to ask (a round trip saved inside the window).
    await attach(qmp, guest.entry, names.cbw, { fresh: true });
  }

  /**
   * Export the frozen view, with the previous checkpoint (disabled by now) as a
   * meta context. Writable only so that it takes discards (viewDiscard.ts): a
   * snapshot-access node refuses writes, and with `unmap` a discard reaches
   * the filter, which stops copying there.
   */
  async export(bitmap: string | null): Promise<NbdAddress> {
    const { qmp, names } = this;
    await blockdevAdd(qmp, { driver: 'snapshot-access', 'node-name': names.snap, file: names.cbw, discard: 'unmap' });
    this.undo.push(() => blockdevDel(qmp, names.snap));
    const bitmaps: BitmapRef[] | undefined = bitmap === null ? undefined : [{ node: this.guest.disk.nodeName, name: bitmap }];
    await blockExportAdd(qmp, { type: 'nbd', id: this.exportName, nodeName: names.snap, name: this.exportName, writable: true, bitmaps }).catch((err: unknown) => {
      if (err instanceof QmpCommandError && /NBD server not running/i.test(err.desc)) throw new VaultError(qmp.socketPath, 'QEMU runs no NBD server at the --qemu-nbd address: leave --qemu-nbd out (vhdvault then starts one) or name the server QEMU runs');
      throw err;
    });
    this.exported = true;
    this.undo.push(() => this.cut());
    return nbdAddress(await this.options.server.locate(this.exportName), this.exportName);
  }

  /** Delete the export, dropping our reader: every read after this fails. Once, however often it is called. */
  cut(): Promise<void> {
    if (!this.exported) return Promise.resolve();
    this.unexport ??= blockExportDel(this.qmp, this.exportName, 'hard');
    return this.unexport;
  }

  /** Undo everything, in reverse; every step is tried, and the first failure thrown at the end. */
  async teardown(): Promise<void> {
    let first: unknown = null;
    for (const step of this.undo.splice(0).reverse()) {
      try {
        await step();
      } catch (err) {
        first ??= err;
      }
    }
    if (first !== null) throw first;
  }
}
