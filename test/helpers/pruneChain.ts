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
import type { Cipher } from '../../src/crypto/aead.js';
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

export type ChainLayout = 'dir' | 'vhd' | 'objects';

/**
 * A repository with `count` backups of a changing disk (`<repo>.raw`), encrypted with `encryption`
 * when given (password: VHDVAULT_PASSWORD, see store.ts's useTestPassword); returns the disk's content per backup id.
 */
export async function makeChain(repo: string, layout: ChainLayout, count: number, encryption?: Cipher): Promise<Map<string, string>> {
  await initRepo(repo, layout, 'none', encryption);
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
export async function expectSound(repo: string, layout: ChainLayout, copies: Map<string, string>, rows?: ListedBackup[]): Promise<void> {
  rows ??= await list(repo);
  const opened = await Repository.open(repo);
  for (const row of rows) {
    const out = `${repo}-check-${row.id}.raw`;
    await restore(opened, 'vm', out, { backup: row.id, format: 'raw' });
    expect(await sameBytes(out, copies.get(row.id)!), `backup ${row.id}`).toBe(true);
    await rm(out);
  }
  await expectOnly(repo, layout, rows.map((r) => r.id));
  expect(rows[0]?.kind).toBe('full');
  expect(rows[0]?.parent).toBeNull();
  rows.slice(1).forEach((r, i) => expect(r.parent).toBe(rows[i]!.id));
}

/**
 * The disk folder holds the files of backups `ids` and nothing else: no temporary file, no lock, no
 * sweep marker; in the objects layout, also no block object that none of their block maps names.
 */
export async function expectOnly(repo: string, layout: ChainLayout, ids: string[], context = ''): Promise<void> {
  const folder = join(repo, 'disks', 'vm');
  const kinds = layout === 'objects' ? ['digests', 'json'] : ['digests', 'json', layout === 'vhd' ? 'vhd' : 'vhd-dir'];
  const files = (await readdir(folder)).sort();
  expect(files, context).toEqual([...(layout === 'objects' ? ['blocks'] : []), ...ids.flatMap((id) => kinds.map((k) => `${id}.${k}`))].sort());
  if (layout !== 'objects') return;
  // Block objects are named by the (keyed, if encrypted) digests their maps hold: read the maps through the store's API.
  const opened = await Repository.open(repo);
  const named = new Set<string>();
  for (const id of ids) {
    const map = await opened.storage.get(`disks/vm/${id}.digests`);
    for (let at = 0; at < map.length; at += 32) named.add(map.toString('hex', at, at + 32));
  }
  const stored = (await readdir(join(folder, 'blocks'), { recursive: true, withFileTypes: true })).filter((e) => e.isFile()).map((e) => e.name);
  expect(stored.length, context).toBeGreaterThan(0);
  expect(stored.filter((name) => !named.has(name)), `block objects no kept map names ${context}`).toEqual([]);
}
