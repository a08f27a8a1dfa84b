/**
 * The live demo: a qemu-storage-daemon "VM" with a sample disk, two live
 * backups (full, then a delta from the checkpoint bitmap) while a qemu-io
 * guest keeps writing, and each restore checked against the disk as it was at
 * the backup's point in time. That content is known because the guest writes
 * only once the backup has started reading (after its point in time): a copy
 * of the disk taken just before the backup is what the backup must hold.
 */
import { rmSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { type LiveBackupReport, liveBackup } from '../live/liveBackup.js';
import { Repository } from '../store/repository.js';
import { restore } from '../store/restore.js';
import { verify } from '../store/verify.js';
import { MiB, mib, sameContent } from './offline.js';
import { copyGuestDisk, type Daemon, GuestWriter, guestWrite, killAll, runTool, startDaemon } from './qsd.js';

const SIZE = 256 * MiB;
const DISK = 'vm';
type Write = [pattern: number, offset: number, length: number];
/** A mostly empty disk: a "system" area, some scattered files, a "log" at the end. */
const SAMPLE_DATA: Write[] = [[0x11, 0, 48 * MiB], [0x22, 100 * MiB, 8 * MiB], [0x33, 180 * MiB + 4096, 3 * MiB], [0x44, SIZE - 4 * MiB, 4 * MiB]];
/** What the guest changes between the two backups: the delta reads only these blocks (and the writer's). */
const CHANGES: Write[] = [[0x55, 10 * MiB, 4 * MiB], [0x66, 101 * MiB, 64 * 1024], [0x77, SIZE - MiB, 4096]];
/** Small, so that the next delta stays small; block 100, which the full backup reads late. */
const WRITER_REGION = { offset: 200 * MiB, length: 4 * MiB, chunk: 256 * 1024 };
/** Reads paced so that the backups last a second or two: long enough for the guest to write during them. */
const PACE = { full: 128 * MiB, delta: 8 * MiB };

interface Guest {
  daemon: Daemon;
  repo: Repository;
  work: string;
  fleecing: string;
}

interface Round {
  report: LiveBackupReport;
  pace: number;
  writer: GuestWriter;
  /** Writes that landed before the backup returned. */
  writesDuring: number;
  /** The restore equals the copy of the disk taken right before the backup. */
  matches: boolean;
  /** The disk after the writer stopped differs from the restore. */
  changedSince: boolean;
}

/** One live backup while the guest writes, its restore, and the two comparisons. */
async function backupRound(g: Guest, n: number, pattern: number, pace: number): Promise<Round> {
  const before = join(g.work, `disk-before-backup${n}.raw`);
  await copyGuestDisk(g.daemon.guestUri, before);
  const writer = new GuestWriter(g.daemon.guestUri, pattern, WRITER_REGION);
  let report: LiveBackupReport;
  let writesDuring: number;
  try {
    report = await liveBackup(g.repo, DISK, {
      qemu: g.daemon.qmpSocket,
      node: 'g0',
      fleecing: g.fleecing,
      // The daemon already runs an NBD server (the guest's): the backup's export goes there too.
      qemuNbd: { transport: 'unix', socket: g.daemon.nbdSocket },
      maxRead: pace,
      // A block read means the point in time has passed: from now on the guest's writes are not in this backup.
      onProgress: () => writer.start(),
    });
    writesDuring = writer.writes;
  } finally {
    await writer.stop();
  }
  const restored = join(g.work, `backup${n}.vhd`);
  await restore(g.repo, DISK, restored, { backup: report.id, format: 'vhd' });
  const after = join(g.work, `disk-after-backup${n}.raw`);
  await copyGuestDisk(g.daemon.guestUri, after);
  return { report, pace, writer, writesDuring, matches: await sameContent(restored, before), changedSince: !(await sameContent(restored, after)) };
}

const yesNo = (ok: boolean) => (ok ? 'yes' : 'NO');
const hex = (byte: number) => `0x${byte.toString(16)}`;

function printRound(n: number, r: Round): void {
  const { report } = r;
  console.log(`backup ${n}: ${report.kind}, ${report.id}, checkpoint used: ${report.previousCheckpoint ?? 'none'}`);
  if (report.note) console.log(`  note: ${report.note}`);
  console.log(`  read ${mib(report.bytesRead)} in ${(report.durationMs / 1000).toFixed(1)} s (paced at ${mib(r.pace)}/s), fleecing peak ${mib(report.fleecingPeakBytes ?? 0)}`);
  console.log(`  the guest wrote ${r.writesDuring} times during the backup (${WRITER_REGION.chunk / 1024} KiB of ${hex(r.writer.pattern)} each), ${r.writer.writes} in all`);
  console.log(`  restore matches the disk at the backup's point in time: ${yesNo(r.matches)}`);
  console.log(`  the disk has changed since (the guest's writes are not in the backup): ${yesNo(r.changedSince)}\n`);
}

export async function liveDemo(keep: boolean, daemonName: string): Promise<void> {
  const started = performance.now();
  // Short: the daemon's sockets live here, and a socket path must fit in 108 bytes.
  const work = await mkdtemp(join(tmpdir(), 'vhdvault-demo-live-'));
  const interrupted = () => {
    killAll();
    if (!keep) rmSync(work, { recursive: true, force: true });
    console.error('\ninterrupted: qemu-storage-daemon and the guest writer killed');
    process.exit(130);
  };
  process.once('SIGINT', interrupted);
  let daemon: Daemon | null = null;
  try {
    const image = join(work, 'guest.qcow2');
    await runTool('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(SIZE)]);
    daemon = await startDaemon(work, image);
    for (const [pattern, offset, length] of SAMPLE_DATA) await guestWrite(daemon.guestUri, pattern, offset, length);
    const fleecing = join(work, 'fleecing');
    await mkdir(fleecing);
    const g: Guest = { daemon, repo: await Repository.init(join(work, 'repo'), { layout: 'dir', compression: 'gzip' }), work, fleecing };

    const full = await backupRound(g, 1, 0xc1, PACE.full);
    for (const [pattern, offset, length] of CHANGES) await guestWrite(daemon.guestUri, pattern, offset, length);
    const delta = await backupRound(g, 2, 0xc2, PACE.delta);
    const check = await verify(g.repo);

    console.log(`vhdvault live demo — ${daemonName} serves a ${mib(SIZE)} qcow2 disk; a qemu-io guest writes to it during each backup\n`);
    printRound(1, full);
    printRound(2, delta);
    console.log(`verify: ${check.problems.length === 0 ? `ok, ${check.blocks} stored blocks re-read` : `${check.problems.length} problems`}`);
    console.log(`total ${((performance.now() - started) / 1000).toFixed(1)} s${keep ? `; files kept in ${work}` : ''}`);
    const deltaFromCheckpoint = delta.report.kind === 'delta' && delta.report.previousCheckpoint === full.report.checkpoint;
    const ok = [full, delta].every((r) => r.matches && r.changedSince) && full.report.kind === 'full' && deltaFromCheckpoint && check.problems.length === 0;
    if (!ok) process.exitCode = 1;
  } finally {
    await daemon?.stop();
    process.removeListener('SIGINT', interrupted);
    if (!keep) await rm(work, { recursive: true, force: true });
  }
}
