/**
 * A backup of a running QEMU disk: the frozen view of frozenView.ts read by
 * the ordinary backup pipeline, as a delta from the previous checkpoint's
 * dirty blocks when that bitmap can be trusted (checkpoint.ts), else from
 * every allocated block diffed by digest. Old data a guest write would
 * overwrite is copied first to a fleecing image on fast local storage
 * (fleecing mode), or straight into the repository (direct mode). Whatever
 * happens, everything vhdvault added to QEMU is removed again, and the guest
 * never sees an error.
 */
import { DEFAULT_CBW_TIMEOUT } from './defaults.js';
import { realpath, stat, statfs } from 'node:fs/promises';
import { resolve } from 'node:path';
import { NbdRequestError } from '../nbd/errors.js';
import { NbdSource } from '../nbd/NbdSource.js';
import type { NbdEndpoint } from '../nbd/uri.js';
import { type BackupOptions, type BackupReport, backupFrom, withBackupLock } from '../store/backup.js';
import { CopyStore } from './copyStore.js';
import { newBackupId } from '../store/names.js';
import type { Repository } from '../store/repository.js';
import { limiter } from '../store/throttle.js';
import { VaultError } from '../util/errors.js';
import { atQuiescedPoint, type QuiesceMode } from './quiesce.js';
import type { DiskLock } from '../store/lock.js';
import type { BlockPool } from '../store/pool.js';
import { CheckpointHandOver, checkpointName, checkpointTag, type PreviousCheckpoint, previousCheckpoint, removeLeftoverBitmaps } from './checkpoint.js';
import { DirectTarget, removeStaleSocketDirs } from './directTarget.js';
import { FleecingImage, FleecingWatch, removeLeftoverImages } from './fleecing.js';
import { FrozenView, removeLeftoverView, ViewNames } from './frozenView.js';
import { findGuestPath } from './guestPath.js';
import { type AroundDiscard, readDiscarding } from './viewDiscard.js';
import { qemuNbdServer } from './qemuNbdServer.js';
import { QmpClient } from '../qmp/QmpClient.js';

export { DEFAULT_CBW_TIMEOUT };
/** Free space under which a fleecing folder counts as full: less than a few of QEMU's 64 KiB copies. */
const FULL_BELOW = 1024 * 1024;

export interface LiveBackupOptions extends Omit<BackupOptions, 'source' | 'fromRaw' | 'changed' | 'bitmap'> {
  /** QEMU's QMP socket. */
  qemu: string;
  /** The guest's raw passthrough node; with `device`, the disk node the device uses. */
  node: string;
  /** A VM's disk device (its qdev id), whose drive the filter is put under. */
  device?: string;
  /** Folder of the fleecing image; without it, direct mode. */
  fleecing?: string;
  /** Abort the backup when the fleecing image holds more than this many bytes. */
  fleecingMax?: number;
  cbwTimeout?: number;
  /** Where QEMU's already running NBD server listens, if it has one. */
  qemuNbd?: NbdEndpoint;
  /** Told what goes wrong on direct mode's NBD connection from QEMU. */
  log?: (message: string) => void;
  /** The guest agent's socket: the guest's filesystems are frozen while the point in time is set. */
  qga?: string;
  /** With `qga`: `try` (default) goes on crash-consistent when the agent fails, `require` fails the backup. */
  quiesce?: QuiesceMode;
  /** Warnings about quiescing, and about discarding. */
  warn?: (message: string) => void;
  /** Discard each block from the frozen view once the backup holds it (default true): see viewDiscard.ts. */
  discard?: boolean;
}

export interface LiveBackupReport extends BackupReport {
  mode: 'fleecing' | 'direct';
  /** Most bytes the fleecing image held at once (null in direct mode). */
  fleecingPeakBytes: number | null;
  /** Bytes the filter copied before guest writes landed (fleecing mode: what the image held at the end plus what discards freed). */
  copiedBytes: number;
  /** Bytes discarded from the frozen view once backed up (the filter copied nothing there after), 0 when the export takes no discards or --no-discard. */
  discardedBytes: number;
  /** Copy requests QEMU made (direct mode; null in fleecing mode, where QEMU does not say). */
  copies: number | null;
  /** The new backup's checkpoint bitmap. */
  checkpoint: string;
  /** The checkpoint the delta was read from, or null. */
  previousCheckpoint: string | null;
  /** Whether the guest's filesystems were frozen at the point in time (through its agent). */
  quiesced: boolean;
  /** How long they were frozen (null when they were not). */
  frozenMs: number | null;
}

/** Where the copies go, and what it can tell afterwards. */
interface Mode {
  target: FleecingImage | DirectTarget;
  watch: FleecingWatch | null;
  copied(): { copiedBytes: number; copies: number | null; fleecingPeakBytes: number | null };
  /** Runs each discard of the view (fleecing mode measures what it frees). */
  around: AroundDiscard;
  /** Why the frozen view failed the backup, when the copy target can tell (the folder filled up, a copy write failed). */
  whyBroken(): Promise<Error | null>;
  /** After QEMU let go of the target. */
  stop(): Promise<void>;
}

/** A read of the frozen view that failed: its snapshot broke (a copy failed, or outlasted --cbw-timeout). */
async function explain(err: unknown, mode: Mode, options: LiveBackupOptions): Promise<unknown> {
  if (mode.watch?.overflow) return mode.watch.overflow;
  if (!(err instanceof NbdRequestError)) return err;
  const why = await mode.whyBroken();
  if (why) return why;
  const timeout = options.cbwTimeout ?? DEFAULT_CBW_TIMEOUT;
  return new VaultError(options.qemu, `reading the frozen view failed (${err.problem}): a copy of old data before a guest write failed or took over --cbw-timeout ${timeout} s, so QEMU gave up the view; backup aborted (the guest's writes went on unharmed)`);
}

/** Check what options name before anything is touched; the fleecing folder made absolute (QEMU opens the image). */
export async function checkLiveOptions<T extends Pick<LiveBackupOptions, 'fleecing'>>(repo: Repository, given: T): Promise<T> {
  // QEMU opens the image: a relative folder would be read from QEMU's working directory.
  const options = given.fleecing === undefined ? given : { ...given, fleecing: resolve(given.fleecing) };
  if (options.fleecing === undefined && !repo.storage.capabilities.localFiles) {
    throw new VaultError(repo.root, 'direct mode writes the copies of old data into the repository\'s folder, and an object store has none: give --fleecing <dir> (a fast local folder)');
  }
  if (options.fleecing === undefined && repo.sealing !== null) {
    // QEMU writes that file in place, as plain disk data: it cannot be sealed object by object.
    throw new VaultError(repo.root, 'is encrypted, and direct mode would write the copies of old data into it unencrypted: give --fleecing <dir> (a fast local folder that stays yours)');
  }
  if (options.fleecing !== undefined) {
    const folder = await stat(options.fleecing).catch(() => null);
    if (!folder?.isDirectory()) throw new VaultError(options.fleecing, 'is not a folder (--fleecing names the folder of the fleecing image)');
  }
  return options;
}

export async function liveBackup(repo: Repository, disk: string, given: LiveBackupOptions): Promise<LiveBackupReport> {
  const options = await checkLiveOptions(repo, given);
  const qmp = await QmpClient.connect(options.qemu);
  try {
    return await withBackupLock(repo, disk, async (lock) => {
      const live = await LiveDisk.prepare(repo, disk, qmp, options);
      try {
        await live.start();
        const quiesced = await atQuiescedPoint({ agent: options.qga, vm: options.qemu, mode: options.quiesce ?? 'try', tell: options.warn ?? (() => undefined) }, () => live.setPoint());
        return { ...(await live.read(lock)), ...quiesced };
      } finally {
        await live.teardown();
      }
    });
  } finally {
    await qmp.close();
  }
}

/** What one disk's live backup reports before quiescing is added (a VM backup reports that once, for all). */
export type LiveDiskReport = Omit<LiveBackupReport, 'quiesced' | 'frozenMs'>;

/**
 * One running disk's live backup, in the steps a VM backup takes for all its
 * disks together: prepare (leftovers, checkpoint, copy target), start (the
 * copy target), setPoint (the point in time: quick, the guest's writes wait),
 * read (the pipeline, up to the commit), teardown (always). Call under the
 * disk's backup lock.
 */
export class LiveDisk {
  private mode: Mode | null = null;
  private report: BackupReport | null = null;
  private tornDown = false;
  private readonly writeLimit: ReturnType<typeof limiter>;

  private constructor(
    private readonly repo: Repository,
    readonly disk: string,
    private readonly qmp: QmpClient,
    private readonly options: LiveBackupOptions,
    readonly id: string,
    private readonly node: string,
    private readonly size: number,
    private readonly previous: PreviousCheckpoint,
    private readonly view: FrozenView,
    private readonly bitmaps: CheckpointHandOver,
  ) {
    this.writeLimit = limiter(options.maxWrite);
  }

  /** Everything before the point in time that touches nothing the guest uses: what killed runs left, the previous checkpoint. */
  static async prepare(repo: Repository, disk: string, qmp: QmpClient, options: LiveBackupOptions): Promise<LiveDisk> {
    const latest = await repo.latest(disk);
    const entry = { node: options.node, device: options.device };
    await removeLeftoverView(qmp, entry);
    if (options.fleecing !== undefined) await removeLeftoverImages(options.fleecing, new ViewNames(options.node));
    await removeStaleSocketDirs();
    const guest = await findGuestPath(qmp, entry);
    const node = guest.disk.nodeName;
    const tag = checkpointTag(await realpath(repo.root).catch(() => repo.root), disk);
    await removeLeftoverBitmaps(qmp, node, tag, latest?.checkpoint?.node === node ? latest.checkpoint.bitmap : null);
    const id = newBackupId(latest?.id);
    const previous = await previousCheckpoint(qmp, node, latest);
    const server = await qemuNbdServer(qmp, options.qemuNbd ?? null);
    const view = new FrozenView(qmp, guest, { id, cbwTimeout: options.cbwTimeout ?? DEFAULT_CBW_TIMEOUT, server });
    const bitmaps = new CheckpointHandOver(qmp, node, guest.disk.drv === 'qcow2', checkpointName(tag, id), previous);
    return new LiveDisk(repo, disk, qmp, options, id, node, guest.disk.virtualSize, previous, view, bitmaps);
  }

  /** The copy target (fleecing image, or direct mode's NBD export of the repository's copy file). */
  async start(): Promise<void> {
    this.mode = await startMode(this.repo, this.disk, this.id, this.size, this.view, this.options, this.writeLimit);
    await this.view.prepare(this.mode.target);
  }

  /** The point in time: the new checkpoint starts, the filter goes in, the old checkpoint stops. */
  setPoint(): Promise<void> {
    return LiveDisk.setPoints(this.qmp, [this]);
  }

  /**
   * Several disks' points in time, as few round trips as can be (the guest
   * waits through them): every new checkpoint in one transaction, each filter
   * into its guest's path, every old checkpoint stopped in one transaction.
   */
  static async setPoints(qmp: QmpClient, all: readonly LiveDisk[]): Promise<void> {
    await CheckpointHandOver.startAll(qmp, all.map((d) => d.bitmaps));
    for (const d of all) await d.view.insert();
    await CheckpointHandOver.handOverAll(qmp, all.map((d) => d.bitmaps));
  }

  /** Read the frozen view into the next backup of the disk, and commit it. */
  async read(lock: DiskLock, pool?: BlockPool): Promise<LiveDiskReport> {
    const mode = this.mode!;
    const { options, previous, bitmaps } = this;
    const address = await this.view.export(previous.valid);
    const source = await NbdSource.open(address, { bitmap: previous.valid });
    let discardedBytes: number;
    try {
      const checkpoint = { bitmap: bitmaps.next, node: this.node };
      const choice = { enabled: options.discard !== false, around: mode.around, warn: options.warn ?? (() => undefined) };
      const read = await readDiscarding(source, choice, (onSettled) =>
        backupFrom(this.repo, this.disk, source, { ...options, source: address.uri }, previous.valid, { id: this.id, note: previous.note, checkpoint, writeLimit: this.writeLimit, lock, pool, onSettled }),
      );
      this.report = read.result;
      discardedBytes = read.discardedBytes;
    } catch (err) {
      throw await explain(err, mode, options);
    } finally {
      await source.close();
    }
    return {
      ...this.report,
      mode: options.fleecing !== undefined ? ('fleecing' as const) : ('direct' as const),
      ...mode.copied(),
      discardedBytes,
      checkpoint: bitmaps.next,
      previousCheckpoint: this.report.bitmap,
    };
  }

  /** Everything vhdvault added to QEMU out again; the checkpoints settled by whether the backup was committed. */
  async teardown(): Promise<void> {
    // Once: a VM backup tears each disk down when it is read, and all of them on the way out.
    if (this.tornDown) return;
    this.tornDown = true;
    const { mode, view, bitmaps } = this;
    await mode?.watch?.stop();
    // Teardown and bitmaps: on failure the first error stays the one reported.
    const done = this.report !== null;
    await settle(this.qmp, this.id, done, [() => view.teardown(), () => mode?.stop() ?? Promise.resolve(), () => (done ? bitmaps.succeeded() : bitmaps.failed())]);
  }
}

async function startMode(repo: Repository, disk: string, id: string, size: number, view: FrozenView, options: LiveBackupOptions, writeLimit: ReturnType<typeof limiter>): Promise<Mode> {
  if (options.fleecing !== undefined) {
    const image = new FleecingImage(options.fleecing, view.names, id, size);
    // Cutting the export fails the reads in flight: the pipeline unwinds and stages nothing.
    const watch = new FleecingWatch(image.path, options.fleecingMax ?? null, () => void view.cut().catch(() => undefined));
    return {
      target: image,
      watch,
      // The filter copies each cluster once; only discards free any: what the image holds at the end, and what they freed, was copied.
      copied: () => ({ copiedBytes: watch.last + watch.freed, copies: null, fleecingPeakBytes: watch.peak }),
      around: (discard) => watch.measureFreed(discard),
      whyBroken: async () => {
        const fs = await statfs(image.dir).catch(() => null);
        const free = fs ? fs.bavail * fs.bsize : Infinity;
        if (free >= FULL_BELOW) return null;
        return new VaultError(image.dir, `fleecing folder is full (${free} bytes free, the image holds ${watch.peak}): a copy of old data before a guest write failed, so QEMU gave up the view; backup aborted (the guest's writes went on unharmed)`);
      },
      stop: async () => {},
    };
  }
  const store = await CopyStore.create(repo.localPath(repo.copiesKey(disk, id)), size, writeLimit);
  const target = await DirectTarget.start(store, options.log ?? (() => {})).catch(async (err: unknown) => {
    await store.remove();
    throw err;
  });
  return {
    target,
    watch: null,
    copied: () => ({ copiedBytes: store.copiedBytes, copies: store.copies, fleecingPeakBytes: null }),
    around: (discard) => discard(),
    whyBroken: async () => store.failure && new VaultError(store.path, `copying old data into the repository failed (${store.failure.message}), so QEMU gave up the view; backup aborted (the guest's writes went on unharmed)`),
    stop: () => target.stop(),
  };
}

/**
 * Run every clean-up step, whatever the others do. After a failure, their
 * errors would hide the one that matters: they are dropped (the next run
 * removes what is left). After a committed backup, the first is reported,
 * saying the backup exists.
 */
async function settle(qmp: QmpClient, id: string, committed: boolean, steps: Array<() => Promise<void>>): Promise<void> {
  let first: Error | null = null;
  for (const step of steps) await step().catch((err: Error) => void (first ??= err));
  if (first !== null && committed) {
    throw new VaultError(qmp.socketPath, `backup ${id} was committed, but cleaning up QEMU failed: ${(first as Error).message} (the next backup removes what is left)`);
  }
}
