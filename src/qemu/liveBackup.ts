/**
 * A backup of a running QEMU disk in fleecing mode: the frozen view of
 * fleecing.ts read by the ordinary backup pipeline, as a delta from the
 * previous checkpoint's dirty blocks when that bitmap can be trusted
 * (checkpoint.ts), else from every allocated block diffed by digest. Whatever
 * happens, everything vhdvault added to QEMU is removed again, and the guest
 * never sees an error.
 */
import { stat } from 'node:fs/promises';
import { NbdSource } from '../nbd/NbdSource.js';
import type { NbdEndpoint } from '../nbd/uri.js';
import { type BackupOptions, type BackupReport, backupFrom, withBackupLock } from '../store/backup.js';
import { newBackupId } from '../store/names.js';
import type { Repository } from '../store/repository.js';
import { VhdError } from '../vhd/errors.js';
import { CheckpointHandOver, checkpointName, previousCheckpoint, removeLeftoverBitmaps } from './checkpoint.js';
import { FleecingView, FleecingWatch, nbdServer, removeLeftoverView } from './fleecing.js';
import { findGuestPath } from './guestPath.js';
import { QmpClient } from './QmpClient.js';

export const DEFAULT_CBW_TIMEOUT = 45;

export interface LiveBackupOptions extends Omit<BackupOptions, 'source' | 'fromRaw' | 'changed' | 'bitmap'> {
  /** QEMU's QMP socket. */
  qemu: string;
  /** The guest's raw passthrough node. */
  node: string;
  /** Folder of the fleecing image. */
  fleecing: string;
  /** Abort the backup when the fleecing image holds more than this many bytes. */
  fleecingMax?: number;
  cbwTimeout?: number;
  /** Where QEMU's already running NBD server listens, if it has one. */
  qemuNbd?: NbdEndpoint;
}

export interface LiveBackupReport extends BackupReport {
  mode: 'fleecing';
  /** Most bytes the fleecing image held at once. */
  fleecingPeakBytes: number;
  /** The new backup's checkpoint bitmap. */
  checkpoint: string;
  /** The checkpoint the delta was read from, or null. */
  previousCheckpoint: string | null;
}

export async function liveBackup(repo: Repository, disk: string, options: LiveBackupOptions): Promise<LiveBackupReport> {
  const folder = await stat(options.fleecing).catch(() => null);
  if (!folder?.isDirectory()) throw new VhdError(options.fleecing, 'is not a folder (--fleecing names the folder of the fleecing image)');
  const qmp = await QmpClient.connect(options.qemu);
  try {
    return await withBackupLock(repo, disk, async () => {
      const latest = await repo.latest(disk);
      await removeLeftoverView(qmp, options.node, options.fleecing);
      const guest = await findGuestPath(qmp, options.node);
      const node = guest.disk.nodeName;
      await removeLeftoverBitmaps(qmp, node, latest?.checkpoint?.node === node ? latest.checkpoint.bitmap : null);

      const id = newBackupId(latest?.id);
      const previous = await previousCheckpoint(qmp, node, latest);
      const server = await nbdServer(qmp, options.qemuNbd ?? null);
      const view = new FleecingView(qmp, guest, { dir: options.fleecing, id, cbwTimeout: options.cbwTimeout ?? DEFAULT_CBW_TIMEOUT, server });
      const bitmaps = new CheckpointHandOver(qmp, node, guest.disk.drv === 'qcow2', checkpointName(id), previous);
      let watch: FleecingWatch | null = null;
      let report: BackupReport | null = null;
      try {
        await bitmaps.start();
        await view.insert();
        await bitmaps.handOver();
        const address = await view.export(previous.valid);
        // Cutting the export fails the reads in flight: the pipeline unwinds and stages nothing.
        watch = new FleecingWatch(view.image, options.fleecingMax ?? null, () => void view.cut().catch(() => undefined));
        const source = await NbdSource.open(address, { bitmap: previous.valid });
        try {
          report = await backupFrom(repo, disk, source, { ...options, source: address.uri }, previous.valid, { id, note: previous.note, checkpoint: { bitmap: bitmaps.next, node } });
        } catch (err) {
          throw watch.overflow ?? err;
        } finally {
          await source.close();
        }
      } finally {
        await watch?.stop();
        // Teardown and bitmaps: on failure the first error stays the one reported.
        const done = report !== null;
        await settle(qmp, id, done, [() => view.teardown(), () => (done ? bitmaps.succeeded() : bitmaps.failed())]);
      }
      return {
        ...report,
        mode: 'fleecing' as const,
        fleecingPeakBytes: watch?.peak ?? 0,
        checkpoint: bitmaps.next,
        previousCheckpoint: report.bitmap,
      };
    });
  } finally {
    await qmp.close();
  }
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
    throw new VhdError(qmp.socketPath, `backup ${id} was committed, but cleaning up QEMU failed: ${(first as Error).message} (the next backup removes what is left)`);
  }
}
