/**
 * A job's health check: can the latest backup of each disk really be used?
 * It is restored as a VHD into a scratch folder; qemu-img (what a user
 * imports it with) must describe it at the disk's exact size and convert it
 * to raw, and every block of that raw image must match the digest the backup
 * recorded. The scratch files are removed after each disk.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, open, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { DigestReader } from '../store/digests.js';
import type { Repository } from '../store/repository.js';
import { restore } from '../store/restore.js';
import { VaultError } from '../util/errors.js';

const run = promisify(execFile);

export interface HealthResult {
  disk: string;
  id: string;
  ok: boolean;
  problem?: string;
}

/** Check the latest backup of each of `disks` in a scratch folder under `scratch` (default: the system's temporary folder). */
export async function healthCheck(repo: Repository, disks: string[], scratch: string | null): Promise<HealthResult[]> {
  const results: HealthResult[] = [];
  if (scratch !== null && !(await stat(scratch).catch(() => null))?.isDirectory()) {
    throw new VaultError(scratch, 'the health check\'s scratch folder does not exist (healthCheck.scratch)');
  }
  for (const disk of disks) {
    const latest = await repo.latest(disk).catch(() => undefined);
    if (!latest) continue;
    const dir = await mkdtemp(join(scratch ?? tmpdir(), 'vhdvault-health-'));
    try {
      const problem = await checkOne(repo, disk, latest.id, latest.size, latest.blockCount, latest.blockSize, dir);
      results.push({ disk, id: latest.id, ok: problem === null, ...(problem ? { problem } : {}) });
    } catch (err) {
      results.push({ disk, id: latest.id, ok: false, problem: (err as Error).message });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }
  return results;
}

async function checkOne(repo: Repository, disk: string, id: string, size: number, blockCount: number, blockSize: number, dir: string): Promise<string | null> {
  const vhd = join(dir, `${disk}.vhd`);
  const raw = join(dir, `${disk}.raw`);
  await restore(repo, disk, vhd, { backup: id, format: 'vhd' });
  const info = JSON.parse((await run('qemu-img', ['info', '--output=json', '-f', 'vpc', vhd])).stdout) as { 'virtual-size'?: number };
  if (info['virtual-size'] !== size) return `qemu-img sees ${info['virtual-size']} bytes in the restored VHD, the disk has ${size}`;
  await run('qemu-img', ['convert', '-f', 'vpc', '-O', 'raw', vhd, raw]);
  await rm(vhd);
  const digests = await DigestReader.open(repo.storage, repo.digestsKey(disk, id), blockCount);
  const fh = await open(raw, 'r');
  try {
    const buf = Buffer.alloc(blockSize);
    for (let block = 0; block < blockCount; block++) {
      const length = Math.min(blockSize, size - block * blockSize);
      buf.fill(0);
      await fh.read(buf, 0, length, block * blockSize);
      if (!repo.digester.of(buf).equals(await digests.get(block))) return `block ${block} of the image qemu-img converted differs from the backup's digest`;
    }
  } finally {
    await fh.close();
    await digests.close();
  }
  return null;
}
