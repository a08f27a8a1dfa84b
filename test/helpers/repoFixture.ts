import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { copyFile, cp, open, readdir, rm, stat } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { expect } from 'vitest';
import type { Cipher } from '../../src/crypto/aead.js';
import { Repository } from '../../src/store/repository.js';
import { restore } from '../../src/store/restore.js';
import { CLI, cliEnv, type CliResult } from './cli.js';
import { makeRaw, sha256 } from './files.js';
import { backupOf, initRepo } from './store.js';

export const MiB = 1024 * 1024;
export const BLOCK = 2 * MiB;

/** Run the CLI without blocking the test's event loop (for commands that must overlap). */
export function vhdvaultAsync(...args: string[]): Promise<CliResult> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { encoding: 'utf8', maxBuffer: 64 * MiB, env: cliEnv() }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
      resolve({ code, stdout, stderr });
    });
  });
}

export interface Fixture {
  repo: string;
  /** Backup ids, oldest first (a full, then deltas). */
  ids: string[];
  /** SHA-256 of the disk's content at each backup. */
  content: Map<string, string>;
}

/**
 * A repository at `repo` holding `count` backups of a `size`-byte disk, each
 * after rewriting one block (block i for backup i), with every block random at first;
 * encrypted with `encryption` when given (password: VHDVAULT_PASSWORD, see store.ts's useTestPassword).
 * Set-up, made in this process through the store's API (`vhdvault init` and `vhdvault backup`
 * without a Node start-up each): the tests drive what they check through the CLI.
 */
export async function makeFixture(repo: string, layout: 'dir' | 'vhd', count: number, size = 8 * MiB, encryption?: Cipher): Promise<Fixture> {
  await initRepo(repo, layout, 'none', encryption);
  const disk = `${repo}.raw`;
  await makeRaw(disk, size, [[0, size]]);
  const ids: string[] = [];
  const content = new Map<string, string>();
  for (let i = 0; i < count; i++) {
    if (i > 0) {
      const fh = await open(disk, 'r+');
      await fh.write(randomBytes(BLOCK), 0, BLOCK, ((i - 1) % (size / BLOCK)) * BLOCK);
      await fh.close();
    }
    const id = await backupOf(repo, 'vm', disk);
    ids.push(id);
    content.set(id, await sha256(disk));
  }
  return { repo, ids, content };
}

/** A copy of a fixture's repository at `to` (the copy's chains must not reach back into the original). */
export async function copyFixture(f: Fixture, to: string): Promise<Fixture> {
  await cp(f.repo, to, { recursive: true });
  return { ...f, repo: to };
}

/** Every file below `root` with its size and mtime: equal snapshots mean nothing was changed or removed. */
export async function snapshot(root: string, skip: (rel: string) => boolean = () => false): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const e of await readdir(root, { recursive: true, withFileTypes: true })) {
    if (!e.isFile()) continue;
    const path = join(e.parentPath, e.name);
    const rel = relative(root, path);
    if (skip(rel)) continue;
    const s = await stat(path);
    out[rel] = `${s.size}:${s.mtimeMs}`;
  }
  return out;
}

/**
 * Restore backup `id` to a raw file in `scratch` and compare it with the disk's content then.
 * A check, so in this process through the store's API (the code `vhdvault restore` runs, without
 * a Node start-up per restore); the CLI's restore has its own tests.
 */
export async function expectRestores(f: Fixture, id: string, scratch: string): Promise<void> {
  const out = join(scratch, `restore-${id}.raw`);
  await restore(await Repository.open(f.repo), 'vm', out, { backup: id, format: 'raw' });
  expect(await sha256(out), `content of backup ${id}`).toBe(f.content.get(id));
  await rm(out);
}

export async function copyMetadata(f: Fixture, id: string, to: string): Promise<void> {
  await copyFile(join(f.repo, 'disks', 'vm', `${id}.json`), to);
}

/** Coordination files that readers and writers may create and remove (never backup data). */
export const isCoordination = (rel: string) => rel.startsWith('access/') || rel === 'reserve' || rel.endsWith('/lock');
