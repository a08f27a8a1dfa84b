/**
 * One disk of a job run, backed up in a process of its own (`vhdvault
 * backup … --json`): a disk that fails, hangs or crashes never takes the
 * others down, and its memory is its own. Its report comes back as JSON; its
 * error as the one line it printed. Aborting sends SIGTERM, on which the
 * backup unwinds and removes its temporary files (cli/progress.ts).
 */
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { nbdAddress } from '../nbd/uri.js';
import type { LiveBackupReport } from '../live/liveBackup.js';
import type { BackupReport } from '../store/backup.js';
import type { VmBackupReport } from '../live/vmBackup.js';
import { type OnProgress, parseProgressLine, PROGRESS_LINES_ENV } from '../util/progress.js';
import type { Job, JobDisk, JobVm } from './jobFile.js';

const CLI = fileURLToPath(new URL('../cli/main.js', import.meta.url));
/** After SIGTERM, how long a backup may take to unwind before it is killed. */
const ABORT_GRACE_MS = 10_000;

export type DiskBackupReport = BackupReport & Partial<Pick<LiveBackupReport, 'mode' | 'copiedBytes' | 'fleecingPeakBytes' | 'checkpoint' | 'previousCheckpoint'>>;

export type Outcome<T> = { ok: true; report: T; durationMs: number } | { ok: false; error: string; durationMs: number };
export type DiskOutcome = Outcome<DiskBackupReport>;

/** `vhdvault backup`'s arguments for one disk of a job. */
export function backupArgs(job: Job, disk: JobDisk, full: boolean): string[] {
  const args = ['backup', job.repository, disk.name, '--json'];
  if (disk.kind === 'file') args.push('--source', disk.path, ...(disk.fromRaw ? ['--from', 'raw'] : []));
  if (disk.kind === 'nbd') args.push('--source', disk.uri, ...(disk.bitmap !== null ? ['--bitmap', disk.bitmap] : []));
  if (disk.kind === 'qemu') {
    args.push('--qemu', disk.qmp, '--node', disk.node);
    if (disk.device !== undefined) args.push('--device', disk.device);
    if (disk.fleecing !== undefined) args.push('--fleecing', disk.fleecing);
    if (disk.fleecingMax !== undefined) args.push('--fleecing-max', String(disk.fleecingMax));
    if (disk.qemuNbd !== undefined) args.push('--qemu-nbd', nbdAddress(disk.qemuNbd, '').uri);
    if (disk.cbwTimeout !== undefined) args.push('--cbw-timeout', String(disk.cbwTimeout));
  }
  if (full) args.push('--full');
  if (job.maxRead !== null) args.push('--max-read', String(job.maxRead));
  if (job.maxWrite !== null) args.push('--max-write', String(job.maxWrite));
  if (job.idlePriority) args.push('--idle-priority');
  return args;
}

/** `vhdvault vm backup`'s arguments for one VM of a job. */
export function vmBackupArgs(job: Job, vm: JobVm, full: boolean): string[] {
  const args = ['vm', 'backup', job.repository, vm.name, '--json'];
  if (vm.kind === 'libvirt') args.push('--libvirt', vm.domain, '--connect', vm.connect);
  else {
    args.push('--qemu', vm.qmp);
    if (vm.qga !== undefined) args.push('--qga', vm.qga);
    if (vm.fleecing !== undefined) args.push('--fleecing', vm.fleecing);
  }
  if (full) args.push('--full');
  if (job.idlePriority) args.push('--idle-priority');
  return args;
}

/** Run one disk's backup in its own process, told its progress; never throws. */
export function backupDisk(args: string[], signal?: AbortSignal, onProgress?: OnProgress): Promise<DiskOutcome> {
  return runBackup<DiskBackupReport>(args, signal, onProgress);
}

/** Run one VM's backup in its own process, told its progress; never throws. */
export function backupVm(args: string[], signal?: AbortSignal, onProgress?: OnProgress): Promise<Outcome<VmBackupReport>> {
  return runBackup<VmBackupReport>(args, signal, onProgress);
}

/** Each whole line of a stream to `onLine`. */
function eachLine(onLine: (line: string) => void): (chunk: string) => void {
  let partial = '';
  return (chunk) => {
    const lines = (partial + chunk).split('\n');
    partial = lines.pop()!;
    for (const line of lines) onLine(line);
  };
}

function runBackup<T>(args: string[], signal?: AbortSignal, onProgress?: OnProgress): Promise<Outcome<T>> {
  const started = performance.now();
  const elapsed = () => Math.round(performance.now() - started);
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve({ ok: false, error: 'not started: the run was stopped', durationMs: 0 });
    // Its own process group: a Ctrl-C at the terminal reaches the run, which stops each backup once (SIGTERM), not twice.
    const env = onProgress ? { ...process.env, [PROGRESS_LINES_ENV]: '1' } : process.env;
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'], detached: true, env });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    // Progress lines go to onProgress; the rest is kept, bounded: a runaway child cannot grow our memory.
    const onLine = (line: string) => {
      const figures = parseProgressLine(line);
      if (figures) onProgress?.(...figures);
      else stderr = `${stderr}${line}\n`.slice(-16384);
    };
    const lines = eachLine(onLine);
    // A last line without its newline is a line too.
    child.stderr.setEncoding('utf8').on('data', lines).on('end', () => lines('\n'));
    let killer: NodeJS.Timeout | null = null;
    const abort = () => {
      child.kill('SIGTERM');
      killer = setTimeout(() => child.kill('SIGKILL'), ABORT_GRACE_MS);
    };
    signal?.addEventListener('abort', abort, { once: true });
    child.once('error', (err) => resolve({ ok: false, error: `could not start vhdvault backup: ${err.message}`, durationMs: elapsed() }));
    child.once('close', (code, sig) => {
      signal?.removeEventListener('abort', abort);
      if (killer) clearTimeout(killer);
      const lastLine = stderr.trim().split('\n').filter((l) => !l.startsWith('note:')).at(-1)?.replace(/^vhdvault: /, '');
      if (code === 0) {
        try {
          return resolve({ ok: true, report: JSON.parse(stdout) as T, durationMs: elapsed() });
        } catch {
          return resolve({ ok: false, error: `vhdvault ${args[0]} printed no report`, durationMs: elapsed() });
        }
      }
      const why = sig ? `killed by ${sig}` : `exit ${code}`;
      resolve({ ok: false, error: lastLine ? `${lastLine} (${why})` : why, durationMs: elapsed() });
    });
  });
}
