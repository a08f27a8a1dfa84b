/**
 * `vm backup --libvirt`: a libvirt domain's disks through libvirt's own
 * backup API (libvirtBackup.ts, pull mode). libvirt sets the point in time
 * of every disk together and records a checkpoint there; vhdvault reads each
 * disk's export (only what the previous checkpoint marks, for a delta), ends
 * the job, and keeps libvirt's checkpoints in step with its VM backups: the
 * newest VM backup's checkpoint is the only one of ours that stays. A domain
 * that is shut off is read from its images through qemu-nbd instead.
 */
import { realpath, rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { openImageThroughQemuNbd } from '../nbd/imageServer.js';
import { NbdSource } from '../nbd/NbdSource.js';
import { readDiscarding } from './viewDiscard.js';
import { type BackupOptions, type BackupReport, backupFrom } from '../store/backup.js';
import type { DiskLock } from '../store/lock.js';
import { BlockPool, defaultConcurrency } from '../store/pool.js';
import { newBackupId } from '../store/names.js';
import type { Repository } from '../store/repository.js';
import { checkVmName, type LibvirtDefinition, type VmRecord, vmDiskName, vmRecords, writeVmRecord } from '../store/vmRecord.js';
import { VaultError } from '../util/errors.js';
import { processTempDir } from '../util/files.js';
import { checkpointTag } from './checkpoint.js';
import { abortLeftoverJob, endBackup, preparePullBackup } from './libvirtBackup.js';
import { type Pausable, resumeLeftoverPause, whilePaused } from './pause.js';
import { checkpoints, deleteCheckpoint, type DomainInfo, domainInfo, domainSubject, onDomain, resume, suspend } from './libvirtDomain.js';
import { atQuiescedPoint, type QuiesceMode } from './quiesce.js';
import { VirshAgent } from './virshAgent.js';
import { readAll, sharedProgress, type VmBackupReport, withBackupLocks } from './vmBackup.js';

export interface LibvirtVmBackupOptions extends Omit<BackupOptions, 'source' | 'fromRaw' | 'changed' | 'bitmap'> {
  domain: string;
  /** libvirt's URI (default qemu:///system). */
  connect: string;
  /** Folder for libvirt's scratch images (default: a new vhdvault-scratch-<pid>-* folder in the system's temporary folder). */
  scratch?: string;
  disks?: string[];
  quiesce: QuiesceMode;
  warn?: (message: string) => void;
  /** Discard what is read from libvirt's views when their exports take discards (default true): see viewDiscard.ts. */
  discard?: boolean;
}

/** Where the previous VM backup left off: the checkpoint a delta reads from, or why every block is read. */
interface Base {
  checkpoint: string | null;
  note?: string;
}

export async function vmBackupLibvirt(repo: Repository, vm: string, options: LibvirtVmBackupOptions): Promise<VmBackupReport> {
  const started = performance.now();
  checkVmName(vm);
  const tell = options.warn ?? (() => undefined);
  const info = await domainInfo(options.connect, options.domain);
  const targets = chosenDisks(info, options.disks);
  if (options.quiesce === 'require' && !info.agent) throw new VaultError(domainSubject(options.domain), 'cannot quiesce the guest (--require-quiesce): the domain has no guest agent channel (org.qemu.guest_agent.0); nothing was backed up');
  const definition = await definitionOf(options.connect, info);
  const names = new Map(targets.map((t) => [t, vmDiskName(vm, t)]));
  const tag = checkpointTag(await realRoot(repo), vm);
  return withBackupLocks(repo, [...names.values()], async (locks) => {
    const latest = (await vmRecords(repo, vm)).at(-1);
    const id = newBackupId(latest?.id);
    const ours = (await checkpoints(options.connect, options.domain)).filter((c) => c.startsWith(tag));
    const base = await baseOf(repo, vm, latest, ours, names, options.full === true);
    const progress = sharedProgress(options.onProgress);
    // One pool of worker threads for every disk, started when the first read needs it (after the point in time).
    const threads: { pool: Promise<BlockPool> | null } = { pool: null };
    const shared = () => (threads.pool ??= BlockPool.create(Math.max(1, options.concurrency ?? defaultConcurrency())));
    const read = { repo, names, locks, options, progress, id, base, pool: shared };
    let taken: Taken;
    try {
      taken = info.state === 'shut off' ? await readOffline(info, targets, read) : await readRunning(info, targets, `${tag}${id}`, read);
    } finally {
      await (await threads.pool)?.close();
    }
    const record: VmRecord = { format: 1, vm, id, createdAt: new Date().toISOString(), disks: Object.fromEntries(targets.map((t, i) => [t, taken.reports[i]!.id])), quiesced: taken.quiesced, frozenMs: taken.frozenMs, pausedMs: taken.pausedMs, checkpoint: taken.checkpoint, definition };
    await writeVmRecord(repo, record);
    // Only the newest VM backup's checkpoint is of use (a delta reads from it): older ones of ours go.
    for (const c of ours) if (c !== taken.checkpoint) await deleteCheckpoint(options.connect, options.domain, c).catch((err: Error) => tell(`${domainSubject(options.domain)}: could not delete the old checkpoint ${c}: ${err.message}`));
    return { vm, id, time: record.createdAt, disks: Object.fromEntries(targets.map((t, i) => [t, taken.reports[i]!])), quiesced: taken.quiesced, frozenMs: taken.frozenMs, pausedMs: taken.pausedMs, definition: 'libvirt', durationMs: Math.round(performance.now() - started) };
  });
}

interface Taken {
  reports: BackupReport[];
  quiesced: boolean;
  frozenMs: number | null;
  pausedMs: number | null;
  checkpoint: string | null;
}

interface ReadContext {
  repo: Repository;
  names: Map<string, string>;
  locks: Map<string, DiskLock>;
  options: LibvirtVmBackupOptions;
  progress: ReturnType<typeof sharedProgress>;
  /** The VM backup's id: each disk's backup takes an id of its own. */
  id: string;
  base: Base;
  /** Worker threads shared by the disks. */
  pool: () => Promise<BlockPool>;
}

/** A running (or paused) domain: libvirt's pull backup, its point in time set in one frozen or paused window. */
async function readRunning(info: DomainInfo, targets: string[], checkpoint: string, ctx: ReadContext): Promise<Taken> {
  const { options, base } = ctx;
  const tell = options.warn ?? (() => undefined);
  // Before a killed run's scratch folder is cleared: its marker tells the job is ours to abort.
  const leftover = await abortLeftoverJob(options.connect, options.domain);
  if (leftover) tell(`${domainSubject(options.domain)}: ${leftover}`);
  const scratch = options.scratch === undefined ? await processTempDir('vhdvault-scratch-') : resolve(options.scratch);
  const pull = await preparePullBackup({ connect: options.connect, domain: options.domain, scratchDir: scratch, disks: targets, incremental: base.checkpoint, checkpoint, socket: join(scratch, 'nbd.sock') });
  let began = false;
  let pausedMs: number | null = null;
  const pausable = domainPausable(options.connect, info);
  await resumeLeftoverPause(pausable, tell);
  try {
    const agent = info.agent && options.quiesce !== 'off' ? new VirshAgent(options.connect, options.domain) : undefined;
    const quiesced = await atQuiescedPoint({ agent, vm: pausable.key, mode: options.quiesce, tell, unfrozen: async (fn) => void (pausedMs = await whilePaused(pausable, fn)) }, async () => {
      await pull.begin();
      began = true;
    });
    const exports = (await pull.exports()).disks;
    const reports = await readAll(
      targets.map((target) => {
        const disk = ctx.names.get(target)!;
        const exp = exports.find((e) => e.target === target);
        return {
          disk,
          read: async () => {
            if (!exp) throw new VaultError(domainSubject(options.domain), `libvirt exported no disk ${target}`);
            const bitmap = base.checkpoint === null ? null : exp.bitmap;
            const source = await NbdSource.open(exp.uri, { bitmap });
            try {
              // libvirt's view is the same copy-before-write snapshot as ours: discarded once read, when its export takes it.
              const pool = await ctx.pool();
              const { result, discardedBytes } = await readDiscarding(source, { enabled: options.discard !== false, warn: tell }, (onSettled) =>
                backupFrom(ctx.repo, disk, source, { ...options, source: exp.uri, onProgress: ctx.progress(target) }, bitmap, { note: base.note, checkpoint: { bitmap: checkpoint, node: `libvirt:${target}` }, lock: ctx.locks.get(disk)!, pool, onSettled }),
              );
              return { ...result, discardedBytes };
            } finally {
              await source.close();
            }
          },
          after: async () => {},
        };
      }),
    ).catch(async (err: unknown) => {
      // A checkpoint whose backup failed is of no use; deleting it gives its changes back to the one before.
      await deleteCheckpoint(options.connect, options.domain, checkpoint).catch(() => undefined);
      throw err;
    });
    return { reports, ...quiesced, pausedMs, checkpoint };
  } finally {
    // A pull job ends only by an abort, a successful one too.
    if (began) await endBackup(options.connect, options.domain, scratch);
    if (options.scratch === undefined) await rm(scratch, { recursive: true, force: true });
  }
}


/** A domain paused through libvirt (virsh suspend and resume). */
function domainPausable(connect: string, info: DomainInfo): Pausable {
  const state = async () => (await onDomain(connect, info.name, ['domstate', '--reason', info.name])).trim();
  return {
    key: `libvirt:${connect}:${info.uuid}`,
    running: async () => (await state()).startsWith('running'),
    // "paused (user)": suspended through the API, as we do; not an I/O error or a migration.
    paused: async () => /^paused \(user\)/.test(await state()),
    pause: () => suspend(connect, info.name),
    resume: () => resume(connect, info.name),
  };
}

/**
 * A shut-off domain: nothing writes, so each image is read as it is, through
 * a qemu-nbd of our own, with the newest checkpoint's persistent bitmap for a
 * delta. No checkpoint can be made offline: the VM backup keeps the newest
 * one, whose bitmap still records every write since (a superset of what
 * changes after this backup).
 */
async function readOffline(info: DomainInfo, targets: string[], ctx: ReadContext): Promise<Taken> {
  const { base } = ctx;
  const reports = await readAll(
    targets.map((target) => {
      const disk = ctx.names.get(target)!;
      const image = info.disks.find((d) => d.target === target)!;
      return {
        disk,
        read: async () => {
          const { source, bitmap, note } = await openOffline(image.source, image.driver, base);
          try {
            return await backupFrom(ctx.repo, disk, source, { ...ctx.options, source: image.source, onProgress: ctx.progress(target) }, bitmap, { note, lock: ctx.locks.get(disk)!, pool: await ctx.pool() });
          } finally {
            await source.close();
          }
        },
        after: async () => {},
      };
    }),
  );
  return { reports, quiesced: false, frozenMs: null, pausedMs: null, checkpoint: base.checkpoint };
}

/**
 * An image through qemu-nbd with the checkpoint's persistent bitmap; without
 * it when qemu-nbd refuses the bitmap (a domain killed rather than shut down
 * leaves its bitmaps marked inconsistent), saying so.
 */
async function openOffline(path: string, format: string, base: Base): Promise<{ source: NbdSource; bitmap: string | null; note?: string }> {
  if (base.checkpoint === null) return { source: await openImageThroughQemuNbd(path, format), bitmap: null, note: base.note };
  try {
    return { source: await openImageThroughQemuNbd(path, format, base.checkpoint), bitmap: base.checkpoint };
  } catch (err) {
    if (!(err instanceof VaultError)) throw err;
    const note = `checkpoint ${base.checkpoint}'s bitmap cannot be read from ${path} (${err.problem}): every allocated block read and compared by digest`;
    return { source: await openImageThroughQemuNbd(path, format), bitmap: null, note };
  }
}

/** The disks to back up: those named (each must be a file-backed disk), else all. */
function chosenDisks(info: DomainInfo, only: string[] | undefined): string[] {
  const all = info.disks.map((d) => d.target);
  if (all.length === 0) throw new VaultError(domainSubject(info.name), 'has no file-backed disk to back up');
  if (only === undefined) return all;
  for (const t of only) if (!all.includes(t)) throw new VaultError(domainSubject(info.name), `has no file-backed disk "${t}" (it has: ${all.join(', ')})`);
  return only;
}

/**
 * The delta's base: the newest VM backup's checkpoint, if libvirt still has
 * it and every disk's newest backup is the one that VM backup names (a disk
 * backed up since, or pruned, breaks the link); else every block is read.
 */
async function baseOf(repo: Repository, vm: string, latest: VmRecord | undefined, ours: string[], names: Map<string, string>, full: boolean): Promise<Base> {
  if (full || !latest) return { checkpoint: null };
  const why = (text: string): Base => ({ checkpoint: null, note: `${text}: every allocated block read and compared by digest` });
  if (latest.checkpoint === null) return why(`the previous VM backup ${latest.id} recorded no checkpoint`);
  if (!ours.includes(latest.checkpoint)) return why(`the previous VM backup's checkpoint ${latest.checkpoint} is gone from libvirt`);
  for (const [target, disk] of names) {
    const newest = await repo.latest(disk);
    if (latest.disks[target] === undefined || newest?.id !== latest.disks[target]) return why(`disk ${target}'s newest backup is not the one VM backup ${latest.id} took`);
  }
  return { checkpoint: latest.checkpoint };
}

/** The domain's persistent definition (what a restore defines again); a transient domain's live one. */
async function definitionOf(connect: string, info: DomainInfo): Promise<LibvirtDefinition> {
  const xml = await onDomain(connect, info.name, ['dumpxml', '--inactive', info.name]).catch(() => info.xml);
  return { kind: 'libvirt', domain: info.name, uuid: info.uuid, xml };
}

const realRoot = (repo: Repository) => realpath(repo.root).catch(() => repo.root);
