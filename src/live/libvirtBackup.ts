/**
 * A libvirt pull-mode backup job (`virsh backup-begin`): libvirt freezes the
 * point in time of the chosen disks together, serves each over NBD on a Unix
 * socket under its target name (with the dirty bitmap since `incremental`
 * when asked), copies what the guest overwrites meanwhile into a scratch
 * image per disk, and records a new checkpoint at that same point.
 *
 * The job lasts until it is aborted, so a vhdvault killed mid-backup leaves
 * it running, with its scratch images growing. The scratch folder holds a
 * marker naming the process that began the job: the next run finds it
 * through backup-dumpxml and aborts the job when that process is gone.
 */
import { readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { nbdAddress } from '../nbd/uri.js';
import { VaultError } from '../util/errors.js';
import { describeOwner, isOwnerGone, lockOwner, parseOwner } from '../util/owner.js';
import { domainInfo, domainSubject, onDomain } from './libvirtDomain.js';
import { attribute, element, elements, escapeXml } from './libvirtXml.js';
import { VirshError } from './virsh.js';

/** In the scratch folder while a job of ours runs: who began it. */
const MARKER = 'vhdvault-libvirt-backup.json';
const scratchFile = (dir: string, target: string) => join(dir, `${target}.scratch.qcow2`);

export interface PullBackupOptions {
  connect: string;
  domain: string;
  /** Where libvirt puts each disk's scratch image (`<target>.scratch.qcow2`) and vhdvault its marker. */
  scratchDir: string;
  /** The disks' targets (vda, …). */
  disks: string[];
  /** The checkpoint whose changes to export, or null for whole disks. */
  incremental: string | null;
  /** The checkpoint the job creates at its point in time. */
  checkpoint: string;
  /** The Unix socket libvirt's NBD server listens on (libvirt creates it). */
  socket: string;
}

export interface PulledDisk {
  target: string;
  exportName: string;
  /** The dirty bitmap the export carries (for NbdSource's `bitmap`), or null in a full backup. */
  bitmap: string | null;
  /** nbd+unix:///<export>?socket=<socket> */
  uri: string;
}

export interface PullBackup {
  disks: PulledDisk[];
}

/** Begins the job, after aborting one a killed vhdvault left on this domain. */
export async function beginPullBackup(options: PullBackupOptions): Promise<PullBackup> {
  const pull = await preparePullBackup(options);
  await pull.begin();
  return pull.exports();
}

/**
 * A pull backup with everything done that can be done before its point in
 * time (the disks checked, a leftover job aborted, the documents written):
 * begin() is then one virsh call, the only one a frozen or paused guest waits for.
 */
export interface PreparedPull {
  /** What aborting a killed vhdvault's job said, for a warning. */
  leftover: string | null;
  begin(): Promise<void>;
  /** Each disk's export, once the job runs. */
  exports(): Promise<PullBackup>;
}

export async function preparePullBackup(options: PullBackupOptions): Promise<PreparedPull> {
  // libvirt (another process, in another folder) needs absolute paths.
  const o = { ...options, scratchDir: resolve(options.scratchDir), socket: resolve(options.socket) };
  const info = await domainInfo(o.connect, o.domain);
  for (const target of o.disks) {
    const disk = info.disks.find((d) => d.target === target);
    if (!disk) throw new VaultError(domainSubject(o.domain), `has no file-backed disk "${target}" (it has: ${info.disks.map((d) => d.target).join(', ') || 'none'})`);
    // libvirt keeps checkpoints as persistent bitmaps, which only qcow2 holds.
    if (disk.driver !== 'qcow2') throw new VaultError(domainSubject(o.domain), `disk ${target} is ${disk.driver}, not qcow2: libvirt cannot keep a checkpoint in it`);
  }
  const leftover = await abortLeftoverJob(o.connect, o.domain);
  const backupXml = join(o.scratchDir, 'backup.xml');
  const checkpointXml = join(o.scratchDir, 'checkpoint.xml');
  await writeFile(backupXml, backupDocument(o));
  await writeFile(checkpointXml, checkpointDocument(o.checkpoint, o.disks, info.disks.map((d) => d.target)));
  // Written before the job exists: a kill right after backup-begin still leaves it for the next run.
  await writeFile(join(o.scratchDir, MARKER), JSON.stringify({ ...lockOwner('backup'), domain: o.domain }));
  const documentsGone = async () => {
    await rm(backupXml, { force: true });
    await rm(checkpointXml, { force: true });
  };
  return {
    leftover,
    begin: async () => {
      try {
        await onDomain(o.connect, o.domain, ['backup-begin', o.domain, backupXml, checkpointXml]);
      } catch (err) {
        // Only a job of this call is aborted: backup-begin may have failed because of someone else's.
        const job = await runningJob(o.connect, o.domain).catch(() => null);
        if (job?.scratchDir === o.scratchDir) await abortJob(o.connect, o.domain).catch(() => undefined);
        await removeScratch(o.scratchDir);
        throw err;
      } finally {
        await documentsGone();
      }
    },
    exports: async () => ({ disks: exported(await onDomain(o.connect, o.domain, ['backup-dumpxml', o.domain]), o.socket) }),
  };
}

function backupDocument(o: PullBackupOptions): string {
  const disks = o.disks.map((t) => `<disk name='${escapeXml(t)}' backup='yes' type='file'><scratch file='${escapeXml(scratchFile(o.scratchDir, t))}'/></disk>`);
  const incremental = o.incremental === null ? '' : `<incremental>${escapeXml(o.incremental)}</incremental>`;
  return `<domainbackup mode='pull'>${incremental}<server transport='unix' socket='${escapeXml(o.socket)}'/><disks>${disks.join('')}</disks></domainbackup>\n`;
}

/** A bitmap on each backed-up disk, none on the others (libvirt would otherwise put one on every disk). */
function checkpointDocument(name: string, backedUp: string[], all: string[]): string {
  const disks = all.map((t) => `<disk name='${escapeXml(t)}' checkpoint='${backedUp.includes(t) ? 'bitmap' : 'no'}'/>`);
  return `<domaincheckpoint><name>${escapeXml(name)}</name><disks>${disks.join('')}</disks></domaincheckpoint>\n`;
}

/** The exports backup-dumpxml lists. */
function exported(xml: string, socket: string): PulledDisk[] {
  return elements(element(xml, 'disks') ?? '', 'disk')
    .filter((d) => attribute(d, 'backup') === 'yes')
    .map((d) => {
      const target = attribute(d, 'name')!;
      const exportName = attribute(d, 'exportname') ?? target;
      return { target, exportName, bitmap: attribute(d, 'exportbitmap'), uri: nbdAddress({ transport: 'unix', socket }, exportName).uri };
    });
}

/** Ends the domain's backup job (none running is fine) and removes its scratch images and our marker. */
export async function endBackup(connect: string, domain: string, scratchDir?: string): Promise<void> {
  const dir = scratchDir ?? (await runningJob(connect, domain))?.scratchDir ?? null;
  await abortJob(connect, domain);
  if (dir !== null) await removeScratch(dir);
}

/** How long libvirt may take to end an aborted job before we say it did not. */
const ABORT_WAIT_MS = 60_000;

async function abortJob(connect: string, domain: string): Promise<void> {
  try {
    await onDomain(connect, domain, ['domjobabort', domain]);
  } catch (err) {
    // Nothing to end: no job, or a domain shut off meanwhile (its jobs ended with it).
    if (!(err instanceof VirshError && /no job is active|domain is not running/i.test(err.said))) throw err;
    return;
  }
  await jobEnded(connect, domain);
}

/**
 * domjobabort returns once QEMU was asked to cancel the backup's block jobs;
 * libvirt ends the job when QEMU says they are gone. A backup begun before
 * then would be refused, so wait for it.
 */
async function jobEnded(connect: string, domain: string): Promise<void> {
  const deadline = Date.now() + ABORT_WAIT_MS;
  for (let pause = 20; ; pause = Math.min(pause * 2, 500)) {
    const info = await onDomain(connect, domain, ['domjobinfo', domain]).catch((err: unknown) => {
      if (err instanceof VirshError && /domain is not running/i.test(err.said)) return 'Job type: None';
      throw err;
    });
    if (/^Job type:\s*None\b/m.test(info)) return;
    if (Date.now() > deadline) throw new VaultError(domainSubject(domain), `its backup job was aborted but has not ended after ${ABORT_WAIT_MS / 1000} s: see virsh domjobinfo ${domain}`);
    await sleep(pause);
  }
}

async function removeScratch(dir: string): Promise<void> {
  // libvirt deletes the scratch images it made when the job ends; these are what it may leave after a crash of its own.
  for (const name of await readdir(dir).catch(() => [] as string[])) if (name.endsWith('.scratch.qcow2') || name === MARKER) await rm(join(dir, name), { force: true });
}

interface RunningJob {
  /** The folder of its scratch images (and of our marker, when the job is ours). */
  scratchDir: string | null;
  xml: string;
}

/** The domain's pull backup job, or null when none runs. */
async function runningJob(connect: string, domain: string): Promise<RunningJob | null> {
  let xml: string;
  try {
    xml = await onDomain(connect, domain, ['backup-dumpxml', domain]);
  } catch (err) {
    if (err instanceof VirshError && /no domain backup job|job id not found/i.test(err.said)) return null;
    throw err;
  }
  const scratch = elements(xml, 'scratch').map((s) => attribute(s, 'file')).find((f): f is string => f !== null);
  return { scratchDir: scratch === undefined ? null : dirname(scratch), xml };
}

/**
 * Aborts the domain's backup job when a vhdvault that is gone began it (its
 * marker is in the job's scratch folder): what it says is for a warning.
 * Returns null when no job runs. A job of a vhdvault still running, or of
 * another program, is left alone: an error, since no backup can begin
 * beside it.
 */
export async function abortLeftoverJob(connect: string, domain: string): Promise<string | null> {
  const job = await runningJob(connect, domain);
  if (job === null) return null;
  const text = job.scratchDir === null ? null : await readFile(join(job.scratchDir, MARKER), 'utf8').catch(() => null);
  const owner = text === null ? null : parseOwner(text);
  if (owner === null) throw new VaultError(domainSubject(domain), `has a backup job that vhdvault did not begin (no ${MARKER} beside its scratch images${job.scratchDir === null ? '' : ` in ${job.scratchDir}`}): end it with virsh domjobabort ${domain}`);
  if (!isOwnerGone(owner, lockOwner('backup'))) throw new VaultError(domainSubject(domain), `has a backup job that ${describeOwner(owner)} began and still runs`);
  await abortJob(connect, domain);
  await removeScratch(job.scratchDir!);
  return `aborted the backup job that ${describeOwner(owner)} left running when it was killed (scratch images in ${job.scratchDir}, NBD socket ${basename(attribute(element(job.xml, 'server') ?? '', 'socket') ?? '?')})`;
}
