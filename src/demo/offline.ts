/**
 * The offline demo: the main job on a sample disk file. Makes the disk, backs
 * it up full, changes some blocks, takes two deltas, restores the latest as a
 * VHD, checks it and prints a short report. Everything happens in a temporary
 * folder, removed at the end unless `keep`.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { backup, type BackupReport } from '../store/backup.js';
import { Repository } from '../store/repository.js';
import { restore } from '../store/restore.js';
import { verify } from '../store/verify.js';
import { formatBytes } from '../util/sizes.js';
import { VhdChain } from '../vhd/VhdChain.js';
import { RawSource } from '../vhd/source.js';

export const MiB = 1024 * 1024;
const SIZE = 256 * MiB;
const BLOCK = 2 * MiB;

async function writeRandom(path: string, ranges: Array<[number, number]>): Promise<void> {
  const fh = await open(path, 'r+');
  for (const [offset, length] of ranges) await fh.write(randomBytes(length), 0, length, offset);
  await fh.close();
}

/** Compare a restored VHD, read through our chain reader, with a raw disk image. */
export async function sameContent(vhd: string, raw: string): Promise<boolean> {
  const chain = await VhdChain.open(vhd);
  const source = await RawSource.open(raw);
  try {
    for (let b = 0; b < source.blockCount; b++) {
      const [a, c] = await Promise.all([chain.readBlock(b), source.readBlock(b)]);
      if (!(a ?? Buffer.alloc(BLOCK)).equals(c ?? Buffer.alloc(BLOCK))) return false;
    }
    return chain.size === source.size;
  } finally {
    await chain.close();
    await source.close();
  }
}

export const mib = formatBytes;

export async function offlineDemo(keep: boolean): Promise<void> {
  const work = await mkdtemp(join(tmpdir(), 'vhdvault-demo-'));
  const started = performance.now();
  try {
    const disk = join(work, 'sample-disk.raw');
    const fh = await open(disk, 'w');
    await fh.truncate(SIZE);
    await fh.close();
    // A mostly empty disk: a "system" area, some scattered files, a "log" at the end.
    await writeRandom(disk, [[0, 48 * MiB], [100 * MiB, 8 * MiB], [180 * MiB + 4096, 3 * MiB], [SIZE - 4 * MiB, 4 * MiB]]);

    const repo = await Repository.init(join(work, 'repo'), { layout: 'dir', compression: 'gzip' });
    const reports: BackupReport[] = [];
    reports.push(await backup(repo, 'sample', { source: disk }));
    await writeRandom(disk, [[10 * MiB, 4 * MiB], [101 * MiB, 64 * 1024], [SIZE - MiB, 4096]]);
    reports.push(await backup(repo, 'sample', { source: disk }));
    await writeRandom(disk, [[200 * MiB, 2 * MiB]]);
    reports.push(await backup(repo, 'sample', { source: disk }));

    const restored = join(work, 'restored.vhd');
    const r = await restore(repo, 'sample', restored, { format: 'vhd' });
    const identical = await sameContent(restored, disk);
    const check = await verify(repo);
    const stored = await repo.backups('sample');

    console.log(`vhdvault demo — a ${mib(SIZE)} sample disk, repository layout dir (gzip)\n`);
    console.log('backup                      kind   blocks written  stored      time    slowest stage');
    for (const [i, rep] of reports.entries()) {
      console.log(
        `${rep.id}  ${rep.kind.padEnd(5)}  ${String(rep.blocksWritten).padStart(14)}  ${mib(stored[i]!.bytesStored).padStart(9)}  ${String(rep.durationMs).padStart(5)} ms  ${rep.boundingStage}`,
      );
    }
    console.log(`\nrestored the latest backup (${r.id}) as a VHD: ${mib(r.bytesWritten)}`);
    console.log(`restored disk identical to the sample disk: ${identical ? 'yes' : 'NO'}`);
    console.log(`verify: ${check.problems.length === 0 ? `ok, ${check.blocks} stored blocks re-read` : `${check.problems.length} problems`}`);
    console.log(`total ${((performance.now() - started) / 1000).toFixed(1)} s${keep ? `; files kept in ${work}` : ''}`);
    if (!identical || check.problems.length > 0) process.exitCode = 1;
  } finally {
    if (!keep) await rm(work, { recursive: true, force: true });
  }
}
