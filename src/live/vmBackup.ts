/**
 * A whole-VM backup (docs/design/11-whole-vm-backups.md): every disk of a
 * running VM at one instant. Each disk gets what a single live backup does
 * (liveBackup.ts's LiveDisk), but the points in time are set together, in
 * one window: the guest frozen through its agent, else the VM paused. Then
 * each disk is read and committed as the next backup of `<vm>.<target>`, and
 * the VM record naming them all is written last.
 */
import { type BackupReport, withBackupLock } from '../store/backup.js';
import type { DiskLock } from '../store/lock.js';
import { BlockPool, defaultConcurrency } from '../store/pool.js';
import { newBackupId } from '../store/names.js';
import type { Repository } from '../store/repository.js';
import { checkVmName, type VmDefinition, type VmRecord, vmDiskName, vmRecords, writeVmRecord } from '../store/vmRecord.js';
import { VaultError } from '../util/errors.js';
import { QmpClient } from '../qmp/QmpClient.js';
import { checkLiveOptions, LiveDisk, type LiveBackupOptions } from './liveBackup.js';
import { qmpPausable, resumeLeftoverPause, whilePaused } from './pause.js';
import { atQuiescedPoint, type QuiesceMode } from './quiesce.js';
import { qemuDefinition, vmDisks } from './qemuVm.js';

export interface VmBackupOptions extends Omit<LiveBackupOptions, 'node' | 'device' | 'quiesce'> {
  /** Only these targets (default: every writable disk). */
  disks?: string[];
  quiesce: QuiesceMode;
}

export interface VmBackupReport {
  vm: string;
  id: string;
  time: string;
  /** Each disk's own backup report, by target. */
  disks: Record<string, BackupReport>;
  quiesced: boolean;
  frozenMs: number | null;
  pausedMs: number | null;
  definition: VmDefinition['kind'];
  durationMs: number;
}

/** Hold every disk's backup lock, in name order (two VM backups never wait on each other in a circle). */
export async function withBackupLocks<T>(repo: Repository, disks: string[], fn: (locks: Map<string, DiskLock>) => Promise<T>): Promise<T> {
  const sorted = [...disks].sort();
  const locks = new Map<string, DiskLock>();
  const take = async (i: number): Promise<T> => {
    if (i === sorted.length) return fn(locks);
    return withBackupLock(repo, sorted[i]!, async (lock) => {
      locks.set(sorted[i]!, lock);
      return take(i + 1);
    });
  };
  return take(0);
}

/** `vm backup --qemu`: every disk device of a running QEMU VM (or those `disks` names), at one point in time. */
export async function vmBackupQemu(repo: Repository, vm: string, given: VmBackupOptions): Promise<VmBackupReport> {
  const started = performance.now();
  checkVmName(vm);
  if (given.quiesce === 'require' && given.qga === undefined) throw new VaultError('--require-quiesce', 'needs a guest agent to freeze the guest: give --qga <socket>');
  const options = await checkLiveOptions(repo, given);
  const tell = options.warn ?? (() => undefined);
  const qmp = await QmpClient.connect(options.qemu);
  try {
    const pausable = qmpPausable(qmp, options.qemu);
    await resumeLeftoverPause(pausable, tell);
    const disks = await vmDisks(qmp, options.disks);
    const definition = await qemuDefinition(qmp, disks);
    const names = new Map(disks.map((d) => [d.target, vmDiskName(vm, d.target)]));
    return await withBackupLocks(repo, [...names.values()], async (locks) => {
      const lives: LiveDisk[] = [];
      let pool: BlockPool | null = null;
      try {
        const progress = sharedProgress(options.onProgress);
        for (const d of disks) lives.push(await LiveDisk.prepare(repo, names.get(d.target)!, qmp, { ...options, node: d.node, device: d.target, onProgress: progress(d.target) }));
        for (const live of lives) await live.start();
        let pausedMs: number | null = null;
        const setPoints = () => LiveDisk.setPoints(qmp, lives);
        const quiesced = await atQuiescedPoint({ agent: options.qga, vm: options.qemu, mode: options.quiesce, tell, unfrozen: async (fn) => void (pausedMs = await whilePaused(pausable, fn)) }, setPoints);
        // Each disk is read and committed on its own; its filter leaves QEMU as soon as it is read.
        // One pool of worker threads for every disk, started once the guest runs on (not to slow the window).
        pool = await BlockPool.create(Math.max(1, options.concurrency ?? defaultConcurrency()));
        const threads = pool;
        const reports = await readAll(lives.map((live) => ({ disk: live.disk, read: () => live.read(locks.get(live.disk)!, threads), after: () => live.teardown() })));
        const record = await recordOf(repo, vm, disks.map((d) => d.target), reports, { ...quiesced, pausedMs, checkpoint: null, definition });
        await writeVmRecord(repo, record);
        return { vm, id: record.id, time: record.createdAt, disks: Object.fromEntries(disks.map((d, i) => [d.target, reports[i]!])), ...quiesced, pausedMs, definition: definition.kind, durationMs: Math.round(performance.now() - started) };
      } finally {
        // What readAll did not reach (a failure before the reads); errors here would hide the first one.
        for (const live of lives) await live.teardown().catch(() => undefined);
        await pool?.close();
      }
    });
  } finally {
    await qmp.close();
  }
}

type OnProgress = NonNullable<LiveBackupOptions['onProgress']>;

/** One progress for all disks read at once: each disk's figures, summed. */
export function sharedProgress(onProgress: OnProgress | undefined): (disk: string) => OnProgress | undefined {
  if (!onProgress) return () => undefined;
  const each = new Map<string, [number, number, number]>();
  return (disk) => (done, total, bytes) => {
    each.set(disk, [done, total, bytes]);
    let d = 0;
    let t = 0;
    let b = 0;
    for (const [x, y, z] of each.values()) (d += x), (t += y), (b += z);
    onProgress(d, t, b);
  };
}

/** One disk's read of a VM backup, and what must follow it whatever happens. */
export interface DiskRead {
  disk: string;
  read(): Promise<BackupReport>;
  after(): Promise<void>;
}

/**
 * Read every disk, all at once (each through its own NBD connection and the
 * shared worker pool), each followed by its `after` as soon as it is read;
 * the first failure is reported once all have ended, naming the disk.
 */
export async function readAll(reads: DiskRead[]): Promise<BackupReport[]> {
  const results = await Promise.allSettled(
    reads.map(async (r) => {
      try {
        return await r.read();
      } finally {
        await r.after();
      }
    }),
  );
  const failed = results.findIndex((r) => r.status === 'rejected');
  if (failed !== -1) {
    const committed = results.flatMap((r, i) => (r.status === 'fulfilled' ? [`${reads[i]!.disk} ${r.value.id}`] : []));
    const err = (results[failed] as PromiseRejectedResult).reason as Error;
    const kept = committed.length > 0 ? `; committed, as disk backups outside any VM backup: ${committed.join(', ')}` : '';
    throw new VaultError(reads[failed]!.disk, `${err.message}: the VM backup is not complete, so none was recorded${kept}`);
  }
  return results.map((r) => (r as PromiseFulfilledResult<BackupReport>).value);
}

export async function recordOf(repo: Repository, vm: string, targets: string[], reports: BackupReport[], rest: Pick<VmRecord, 'quiesced' | 'frozenMs' | 'pausedMs' | 'checkpoint' | 'definition'>): Promise<VmRecord> {
  const latest = (await vmRecords(repo, vm)).at(-1);
  const id = newBackupId(latest?.id);
  return { format: 1, vm, id, createdAt: new Date().toISOString(), disks: Object.fromEntries(targets.map((t, i) => [t, reports[i]!.id])), ...rest };
}
