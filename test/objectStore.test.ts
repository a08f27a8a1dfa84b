// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
/**
 * The repository's life — backups, deltas, list, verify, restore, prune with
 * merges, kill -9 during backup and prune — driven through the built CLI
 * against each storage: a folder (the default dir layout), a folder in the
 * objects layout, and a bucket of each S3 engine of the tests (helpers/s3.ts):
 * s3rver, and Ceph's RADOS Gateway, a real distributed store, both on 127.0.0.1.
 */
import { spawn } from 'node:child_process';
import { randomInt } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { copyFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, test } from 'vitest';
import { CLI, cliEnv, type CliResult, vhdvaultAsync } from './helpers/cli.js';
import { makeRaw, sameBytes, tempDir } from './helpers/files.js';
import { scribble } from './helpers/pruneChain.js';
import { newBucket, s3Engines, s3Env } from './helpers/s3.js';
import { backupOf, expectEncrypted, useTestPassword } from './helpers/store.js';
import { type Location, Repository } from '../src/store/repository.js';
import { restore } from '../src/store/restore.js';
import { verify } from '../src/store/verify.js';

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;
const SIZE = 16 * MiB;

const dir = await tempDir();
const engines = s3Engines();
// The CLI runs with this process's environment (helpers/cli.ts): credentials the standard AWS way. Each S3
// repository names its engine's endpoint (--endpoint, Location.endpoint): the engines' tests run side by side.
Object.assign(process.env, s3Env((await engines.find((e) => e.name === 's3rver')!.server()).endpoint), { VHDVAULT_CACHE_DIR: join(dir, 'cache') });
// The encrypted repositories' password (VHDVAULT_PASSWORD), for this process and every CLI it starts.
useTestPassword();

interface Backend {
  name: string;
  /** A new, empty repository location of this backend. */
  location(tag: string): Promise<Location>;
  initArgs: string[];
  /** Why its tests are skipped here (an S3 engine that is not installed), else undefined. */
  skip?: string;
  /** Whether its kill -9 test runs (the objects layout's, on a folder and on s3rver: see the Ceph note at the test). */
  kills: boolean;
  /** Encrypted (initArgs say with which cipher): only the kill test runs, and checks that the repository really is. */
  encrypted?: boolean;
}

const BACKENDS: Backend[] = [
  { name: 'folder (dir layout)', location: async (tag) => ({ root: join(dir, `dir-${tag}`) }), initArgs: [], kills: false },
  { name: 'folder (objects layout)', location: async (tag) => ({ root: join(dir, `obj-${tag}`) }), initArgs: ['--layout', 'objects'], kills: true },
  ...engines.map(
    (engine): Backend => ({
      name: `S3 (${engine.title})`,
      skip: engine.skip,
      async location(tag) {
        const { endpoint } = await engine.server();
        return { root: `s3://${await newBucket(endpoint)}/repo-${tag}`, endpoint };
      },
      initArgs: [],
      kills: engine.name === 's3rver',
    }),
  ),
  // The kill test on encrypted repositories: the objects layout on a folder and on s3rver.
  { name: 'folder (objects layout, encrypted)', location: async (tag) => ({ root: join(dir, `obj-enc-${tag}`) }), initArgs: ['--layout', 'objects', '--encryption', 'aes-256-gcm'], kills: true, encrypted: true },
  ...engines
    .filter((engine) => engine.name === 's3rver')
    .map(
      (engine): Backend => ({
        name: `S3 (${engine.title}, encrypted)`,
        async location(tag) {
          const { endpoint } = await engine.server();
          return { root: `s3://${await newBucket(endpoint)}/repo-enc-${tag}`, endpoint };
        },
        initArgs: ['--encryption', 'chacha20-poly1305'],
        kills: true,
        encrypted: true,
      }),
    ),
];

/** The arguments of `vhdvault <command> <repo> ...rest` for a repository at `repo` (its endpoint, if it names one). */
function argsAt(command: string, repo: Location, ...rest: string[]): string[] {
  return [command, repo.root, ...rest, ...(repo.endpoint !== undefined ? ['--endpoint', repo.endpoint] : [])];
}

/** `vhdvault <command> <repo> ...rest` through the built CLI. */
function cli(command: string, repo: Location, ...rest: string[]): Promise<CliResult> {
  return vhdvaultAsync(...argsAt(command, repo, ...rest));
}

function ok(r: CliResult): CliResult {
  expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0);
  return r;
}

interface Listed {
  id: string;
  kind: 'full' | 'delta';
  parent: string | null;
}

async function list(repo: Location): Promise<Listed[]> {
  const r = ok(await cli('list', repo, 'vm', '--json'));
  return (JSON.parse(r.stdout) as { backups: Listed[] }).backups;
}

/**
 * One more backup of the disk; records the disk's content under the new id.
 * Through the CLI where the backup is what a test checks, else in this process (set-up).
 */
async function backupAndCopy(repo: Location, disk: string, copies: Map<string, string>, via: 'cli' | 'api' = 'api'): Promise<string> {
  const id = via === 'cli' ? ok(await cli('backup', repo, 'vm', '--source', disk)).stdout.trim() : await backupOf(repo, 'vm', disk);
  const copy = `${disk}-${id}`;
  await copyFile(disk, copy);
  copies.set(id, copy);
  return id;
}

/**
 * Every listed backup restores exactly and verify finds nothing — checked in this
 * process through the store's API (the same code the CLI runs, without a Node
 * start-up and an S3 client load per restore: the commands under test run the CLI).
 */
async function expectSound(root: Location, copies: Map<string, string>): Promise<Listed[]> {
  const repo = await Repository.open(root);
  const rows = await list(root);
  for (const row of rows) {
    const out = join(dir, `check-${row.id}-${randomInt(1e9)}.raw`);
    await restore(repo, 'vm', out, { backup: row.id });
    expect(await sameBytes(out, copies.get(row.id)!), `backup ${row.id}`).toBe(true);
    await rm(out);
  }
  expect((await verify(repo)).problems).toEqual([]);
  expect(rows[0]?.kind).toBe('full');
  rows.slice(1).forEach((r, i) => expect(r.parent).toBe(rows[i]!.id));
  return rows;
}

/** Block objects in an objects-layout repository's disk folder (read through the store's API). */
async function blockObjects(repo: Location): Promise<number> {
  const r = await Repository.open(repo);
  let n = 0;
  for await (const _ of r.storage.listAll(r.blocksKey('vm'))) n++;
  return n;
}

for (const backend of BACKENDS) {
  // The storages side by side (each its own repositories and disks), each one's tests in turn.
  describe.skipIf(backend.skip !== undefined).concurrent(`repository on ${backend.name}`, () => {
    // An encrypted backend runs the kill test only (its life and prune are encryption's own tests').
    const it = backend.encrypted ? () => undefined : test.sequential;
    const objects = !backend.name.includes('dir layout');
    // The dir layout's kill tests are crash.test.ts and pruneKill*.test.ts; here the objects layout's, on a folder and on s3rver.
    const killIt = backend.kills ? test.sequential : () => undefined;

    it('backs up a changing disk (full, then deltas), lists, verifies and restores every backup exactly, also as VHD', async () => {
      const repo = await backend.location('life');
      ok(await cli('init', repo, ...backend.initArgs));
      const disk = join(dir, `life-${backend.initArgs.length}-${randomInt(1e9)}.raw`);
      await makeRaw(disk, SIZE, [[0, SIZE]]);
      const copies = new Map<string, string>();
      await backupAndCopy(repo, disk, copies, 'cli');
      const original = `${disk}-orig`;
      await copyFile(disk, original);
      await scribble(disk, [1, 5]);
      await backupAndCopy(repo, disk, copies, 'cli');
      // Block 5 becomes zeros (the delta must hide the old data), block 1 goes back to its first content.
      execFileSync('dd', ['if=/dev/zero', `of=${disk}`, `bs=${BLOCK}`, 'seek=5', 'count=1', 'conv=notrunc'], { stdio: 'ignore' });
      execFileSync('dd', [`if=${original}`, `of=${disk}`, `bs=${BLOCK}`, 'skip=1', 'seek=1', 'count=1', 'conv=notrunc'], { stdio: 'ignore' });
      await backupAndCopy(repo, disk, copies, 'cli');
      const rows = await expectSound(repo, copies);
      expect(rows.map((r) => r.kind)).toEqual(['full', 'delta', 'delta']);
      if (objects) {
        // 8 blocks of the full + 2 new ones; the returning block 1 and the zeros need no new object.
        expect(await blockObjects(repo)).toBe(10);
      }
      // The latest as a dynamic VHD, which qemu-img reads as the disk.
      const vhd = join(dir, `life-${randomInt(1e9)}.vhd`);
      ok(await cli('restore', repo, 'vm', vhd));
      execFileSync('qemu-img', ['compare', '-f', 'vpc', '-F', 'raw', vhd, disk], { stdio: 'pipe' });
    });

    it('prune merges removed backups into their children: kept backups restore exactly, removed blocks are freed', async () => {
      const repo = await backend.location('prune');
      ok(await cli('init', repo, ...backend.initArgs));
      const disk = join(dir, `prune-${randomInt(1e9)}.raw`);
      await makeRaw(disk, SIZE, [[0, SIZE]]);
      const copies = new Map<string, string>();
      for (let i = 0; i < 5; i++) {
        if (i > 0) await scribble(disk, [i, (i * 3) % 8]);
        await backupAndCopy(repo, disk, copies);
      }
      const before = objects ? await blockObjects(repo) : 0;
      const r = ok(await cli('prune', repo, '--keep-last', '2', '--json'));
      const report = JSON.parse(r.stdout) as { merged: number; removed: string[]; collected?: { objects: number } };
      expect(report.merged).toBe(3);
      const rows = await expectSound(repo, copies);
      expect(rows).toHaveLength(2);
      if (objects) {
        // What only the three removed backups named is gone; what the kept ones name is all there (verify read it).
        expect(report.collected!.objects).toBeGreaterThan(0);
        expect(await blockObjects(repo)).toBe(before - report.collected!.objects);
        expect(await blockObjects(repo)).toBeLessThanOrEqual(8 + 2);
      }
    });

    killIt('kill -9 at random moments of backups and prunes: the next runs finish or undo, and nothing committed is lost', async () => {
      const repo = await backend.location('kill');
      ok(await cli('init', repo, ...backend.initArgs));
      const disk = join(dir, `kill-${randomInt(1e9)}.raw`);
      await makeRaw(disk, SIZE, [[0, SIZE]]);
      const copies = new Map<string, string>();
      await backupAndCopy(repo, disk, copies);
      if (backend.encrypted) await expectEncrypted(repo);
      const seed = Number(process.env.KILL_SEED ?? randomInt(1e9));
      console.log(`kill test on ${backend.name}: KILL_SEED=${seed}`);
      let state = seed;
      const rand = (n: number) => ((state = (state * 1103515245 + 12345) % 2 ** 31) % n);
      const killAfter = async ([command, ...rest]: [string, ...string[]], maxMs: number) => {
        const args = argsAt(command, repo, ...rest);
        const child = spawn(process.execPath, [CLI, ...args], { stdio: 'ignore', env: cliEnv() });
        const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
        await Promise.race([sleep(rand(maxMs)), exited]);
        child.kill('SIGKILL');
        return exited;
      };
      for (let k = 0; k < 3; k++) {
        await scribble(disk, [rand(8), rand(8)]);
        await killAfter(['backup', 'vm', '--source', disk], 1500);
        await backupAndCopy(repo, disk, copies);
        // A killed backup that had committed (or whose commit the next writer finished) read the disk as it still is.
        for (const row of await list(repo)) {
          if (copies.has(row.id)) continue;
          await copyFile(disk, `${disk}-${row.id}`);
          copies.set(row.id, `${disk}-${row.id}`);
        }
        await killAfter(['prune', '--keep-last', '2'], 1500);
      }
      ok(await cli('prune', repo, '--keep-last', '2'));
      const rows = await expectSound(repo, copies);
      expect(rows).toHaveLength(2);
      if (objects) {
        // The rerun's collection left exactly what the kept maps name (killed uploads included).
        const second = ok(await cli('prune', repo, '--keep-last', '2', '--json'));
        expect((JSON.parse(second.stdout) as { collected: { objects: number } }).collected.objects).toBe(0);
      }
    });
  });
}
