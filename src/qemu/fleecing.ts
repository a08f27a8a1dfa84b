/**
 * The frozen view of a running guest's disk (REFERENCE.md, "Live backup with
 * QEMU"): a copy-before-write filter put into the guest's path copies old
 * data into a sparse fleecing image before a guest write lands; a
 * snapshot-access node over the filter, exported read-only over NBD, reads
 * the disk as it was when the filter went in. `on-cbw-error=break-snapshot`:
 * a copy that fails (folder full) or times out fails our reads, never the
 * guest's write.
 */
import { mkdtemp, open, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { NbdAddress, NbdEndpoint } from '../nbd/uri.js';
import { VhdError } from '../vhd/errors.js';
import { blockdevAdd, blockdevDel, blockExportAdd, blockExportDel, type BitmapRef, nbdServerStart, nbdServerStop, queryBlockExports, queryNamedBlockNodes } from './commands.js';
import { QmpCommandError } from './errors.js';
import { fileChild, type GuestPath, OUR_PREFIX, reopenOver } from './guestPath.js';
import type { QmpClient } from './QmpClient.js';

export const FLEECE_NODE = `${OUR_PREFIX}fleece`;
export const CBW_NODE = `${OUR_PREFIX}cbw`;
export const SNAP_NODE = `${OUR_PREFIX}snap`;
const IMAGE_SUFFIX = '.fleece.raw';

/** Where QEMU serves our export: its own server (started by us, or named with --qemu-nbd). */
export interface NbdServer {
  endpoint: NbdEndpoint;
  /** Stop it, if we started it (stopping a server deletes every export on it). */
  release(): Promise<void>;
}

/**
 * Start an NBD server in QEMU on a socket of our own, or use the one
 * `given` names. QMP cannot tell where a running server listens, so one we
 * did not start must be named.
 */
export async function nbdServer(qmp: QmpClient, given: NbdEndpoint | null): Promise<NbdServer> {
  if (given) return { endpoint: given, release: async () => {} };
  const dir = await mkdtemp(join(tmpdir(), 'vhdvault-nbd-'));
  const socket = join(dir, 'nbd.sock');
  try {
    await nbdServerStart(qmp, socket);
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    if (err instanceof QmpCommandError && /already running/i.test(err.desc)) throw new VhdError(qmp.socketPath, 'QEMU already runs an NBD server: give its address with --qemu-nbd <uri>');
    throw err;
  }
  return {
    endpoint: { transport: 'unix', socket },
    release: async () => {
      try {
        await nbdServerStop(qmp);
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    },
  };
}

/**
 * Take out what a killed run left, in teardown order: its exports, the
 * snapshot node, the filter out of the guest's path (`guestNode` back over
 * the filter's own child), the filter, the fleecing node and images.
 */
export async function removeLeftoverView(qmp: QmpClient, guestNode: string, fleecingDir: string): Promise<void> {
  for (const e of await queryBlockExports(qmp)) {
    if (e.id.startsWith(OUR_PREFIX)) await blockExportDel(qmp, e.id, 'hard');
  }
  const names = new Set((await queryNamedBlockNodes(qmp)).map((n) => n.nodeName));
  if (names.has(SNAP_NODE)) await blockdevDel(qmp, SNAP_NODE);
  const child = await fileChild(qmp, guestNode);
  if (child?.startsWith(OUR_PREFIX)) {
    const disk = await fileChild(qmp, child);
    if (!disk) throw new VhdError(qmp.socketPath, `block node "${child}" left by an earlier backup has no file child`);
    await reopenOver(qmp, guestNode, disk);
  }
  for (const node of [CBW_NODE, FLEECE_NODE]) if (names.has(node)) await blockdevDel(qmp, node);
  for (const name of await readdir(fleecingDir)) {
    if (name.startsWith(OUR_PREFIX) && name.endsWith(IMAGE_SUFFIX)) await rm(join(fleecingDir, name), { force: true });
  }
}

export interface FleecingOptions {
  /** Folder of the fleecing image (fast local storage). */
  dir: string;
  /** The backup's id: names the image and the export. */
  id: string;
  /** Seconds a copy may take before the snapshot breaks (and the backup with it). */
  cbwTimeout: number;
  server: NbdServer;
}

/** Undo steps of a view being set up, run in reverse by teardown(). */
type Undo = () => Promise<void>;

export class FleecingView {
  readonly image: string;
  readonly exportName: string;
  private readonly undo: Undo[] = [];
  private unexport: Promise<void> | null = null;
  private exported = false;

  constructor(
    private readonly qmp: QmpClient,
    private readonly guest: GuestPath,
    private readonly options: FleecingOptions,
  ) {
    this.image = join(options.dir, `${OUR_PREFIX}${options.id}${IMAGE_SUFFIX}`);
    this.exportName = `${OUR_PREFIX}${options.id}`;
    // Last in teardown: by then our export is gone, and a server we started serves nothing else.
    this.undo.push(() => options.server.release());
  }

  /** The point in time: the filter enters the guest's path. Anything set up before a failure is undone by teardown(). */
  async insert(): Promise<void> {
    const { qmp, guest } = this;
    const fh = await open(this.image, 'wx');
    this.undo.push(() => rm(this.image, { force: true }));
    try {
      await fh.truncate(guest.disk.virtualSize); // sparse: only copied data takes space
    } finally {
      await fh.close();
    }
    await blockdevAdd(qmp, { driver: 'file', 'node-name': FLEECE_NODE, filename: this.image });
    this.undo.push(() => blockdevDel(qmp, FLEECE_NODE));
    // No `bitmap`: the whole disk is protected, so a write during the bitmap hand-over is never lost.
    await blockdevAdd(qmp, { driver: 'copy-before-write', 'node-name': CBW_NODE, file: guest.disk.nodeName, target: FLEECE_NODE, 'on-cbw-error': 'break-snapshot', 'cbw-timeout': this.options.cbwTimeout });
    this.undo.push(() => blockdevDel(qmp, CBW_NODE));
    this.undo.push(() => reopenOver(qmp, guest.node, guest.disk.nodeName)); // before reopening: a failed reopen may have half-happened
    await reopenOver(qmp, guest.node, CBW_NODE);
  }

  /** Export the frozen view read-only, with the previous checkpoint (disabled by now) as a meta context. */
  async export(bitmap: string | null): Promise<NbdAddress> {
    const { qmp } = this;
    await blockdevAdd(qmp, { driver: 'snapshot-access', 'node-name': SNAP_NODE, file: CBW_NODE });
    this.undo.push(() => blockdevDel(qmp, SNAP_NODE));
    const bitmaps: BitmapRef[] | undefined = bitmap === null ? undefined : [{ node: this.guest.disk.nodeName, name: bitmap }];
    await blockExportAdd(qmp, { type: 'nbd', id: this.exportName, nodeName: SNAP_NODE, name: this.exportName, writable: false, bitmaps });
    this.exported = true;
    this.undo.push(() => this.cut());
    const { endpoint } = this.options.server;
    const uri = endpoint.transport === 'unix' ? `nbd+unix:///${this.exportName}?socket=${endpoint.socket}` : `nbd://${endpoint.host.includes(':') ? `[${endpoint.host}]` : endpoint.host}:${endpoint.port}/${this.exportName}`;
    return { uri, endpoint, exportName: this.exportName, bitmap: null };
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

/** Allocated bytes of the fleecing image, sampled about every 100 ms; the peak, and a trip past `max`. */
export class FleecingWatch {
  peak = 0;
  /** Set when the image grew past `max`: why the backup was cut short. */
  overflow: VhdError | null = null;
  private readonly timer: NodeJS.Timeout;
  private sampling: Promise<void> = Promise.resolve();

  constructor(
    private readonly image: string,
    private readonly max: number | null,
    private readonly onOverflow: () => void,
  ) {
    this.timer = setInterval(() => {
      this.sampling = this.sampling.then(() => this.sample());
    }, 100);
  }

  async stop(): Promise<void> {
    clearInterval(this.timer);
    await this.sampling;
    await this.sample();
  }

  private async sample(): Promise<void> {
    const used = await stat(this.image).then(
      (s) => s.blocks * 512,
      () => 0, // gone: the view is torn down
    );
    this.peak = Math.max(this.peak, used);
    if (this.max !== null && used > this.max && !this.overflow) {
      this.overflow = new VhdError(this.image, `the fleecing image grew to ${used} bytes, past --fleecing-max ${this.max}: backup aborted (the guest's writes went on unharmed)`);
      this.onOverflow();
    }
  }
}
