/**
 * Chains of backups for the prune tests (prune.test.ts, pruneKillRandom.test.ts):
 * built through the store's API in this process (set-up, not what is tested),
 * and checked there too (restores); prune runs the built CLI.
 */
import { randomBytes } from 'node:crypto';
import { copyFile, open, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { expect } from 'vitest';
import { Repository } from '../../src/store/repository.js';
import { restore } from '../../src/store/restore.js';
import { makeRaw, sameBytes } from './files.js';
import { backupOf, initRepo, listed, type ListedBackup } from './store.js';

const MiB = 1024 * 1024;
export const BLOCK = 2 * MiB;
export const SIZE = 16 * MiB;

/** `vhdvault list <repo> vm --json`, read in this process. */
export function list(repo: string): Promise<ListedBackup[]> {
  return listed(repo, 'vm');
}

/** Overwrite whole blocks of a raw image with random data. */
export async function scribble(raw: string, blocks: number[]): Promise<void> {
  const fh = await open(raw, 'r+');
  for (const b of blocks) await fh.write(randomBytes(BLOCK), 0, BLOCK, b * BLOCK);
  await fh.close();
}

/**
 * One more backup of `disk` (`vhdvault backup <repo> vm --source <disk> [--full]`),
 * and a copy of the disk as it was, recorded under the new id in `copies`.
 */
export async function backupAndCopy(repo: string, disk: string, copies: Map<string, string>, full = false): Promise<string> {
  const id = await backupOf(repo, 'vm', disk, { full });
  const copy = `${repo}-${id}.raw`;
  await copyFile(disk, copy);
  copies.set(id, copy);
  return id;
}

/** A repository with `count` backups of a changing disk (`<repo>.raw`); returns the disk's content per backup id. */
export async function makeChain(repo: string, layout: 'dir' | 'vhd', count: number): Promise<Map<string, string>> {
  await initRepo(repo, layout);
  const disk = `${repo}.raw`;
  await makeRaw(disk, SIZE, [[0, SIZE]]);
  const copies = new Map<string, string>();
  for (let i = 0; i < count; i++) {
    if (i > 0) await scribble(disk, [i % 8, (i * 3) % 8]);
    await backupAndCopy(repo, disk, copies);
  }
  return copies;
}

/**
 * Every listed backup restores exactly (checked in this process through the store's
 * API: the code `vhdvault restore` runs, without a Node start-up per restore; the
 * commands under test run the CLI); the disk folder holds nothing else; the chain
 * is a chain from a full. `rows` is the listing when the caller already has it.
 */
export async function expectSound(repo: string, layout: 'dir' | 'vhd', copies: Map<string, string>, rows?: ListedBackup[]): Promise<void> {
  rows ??= await list(repo);
  const opened = await Repository.open(repo);
  for (const row of rows) {
    const out = `${repo}-check-${row.id}.raw`;
    await restore(opened, 'vm', out, { backup: row.id, format: 'raw' });
    expect(await sameBytes(out, copies.get(row.id)!), `backup ${row.id}`).toBe(true);
    await rm(out);
  }
  const files = await readdir(join(repo, 'disks', 'vm'));
  expect(files.sort()).toEqual(rows.flatMap((r) => [`${r.id}.digests`, `${r.id}.json`, `${r.id}.${layout === 'vhd' ? 'vhd' : 'vhd-dir'}`]).sort());
  expect(rows[0]?.kind).toBe('full');
  expect(rows[0]?.parent).toBeNull();
  rows.slice(1).forEach((r, i) => expect(r.parent).toBe(rows[i]!.id));
}
