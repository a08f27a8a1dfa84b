/**
 * What an S3 repository's commands say when something in it (or beside it) is
 * wrong, through the built CLI, one fresh bucket per test: each message names
 * the thing that is wrong, the backup concerned and the problem, on one line,
 * and blames nothing that is not at fault.
 */
import { createHash } from 'node:crypto';
import { lstat, mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { type CliResult, expectRefused, vhdvaultAsync } from './helpers/cli.js';
import { startFaultProxy } from './helpers/faultProxy.js';
import { makeRaw, tempDir } from './helpers/files.js';
import { scribble } from './helpers/pruneChain.js';
import { newBucket, s3Env, startS3 } from './helpers/s3.js';
import { backupOf, initRepo } from './helpers/store.js';
import { blockObjectKey, loadBlockMap } from '../src/store/layouts/blockObjects.js';
import { Repository } from '../src/store/repository.js';
import { restore } from '../src/store/restore.js';

const MiB = 1024 * 1024;

const dir = await tempDir('vhdvault-s3msgs-');
const cache = join(dir, 'cache');
const s3 = await startS3();
// CLI children inherit this environment (helpers/cli.ts): the test server, the standard AWS way.
Object.assign(process.env, s3Env(s3.endpoint), { VHDVAULT_CACHE_DIR: cache });
afterAll(() => s3.close());

function ok(r: CliResult): CliResult {
  expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0);
  return r;
}

/** Each line on stderr a message of its own: no stack, no line broken in two. */
function expectLines(stderr: string): string[] {
  expect(stderr, stderr).not.toMatch(/\n\s+at |node:internal/);
  const lines = stderr.trimEnd().split('\n');
  for (const line of lines) expect(line, stderr).toMatch(/^(vhdvault: |note: )/);
  return lines;
}

/**
 * Set up in this process: a new repository (objects layout) in its own bucket, with `count`
 * backups of an 8 MiB disk of random data, backup i changing block i-1.
 */
async function chain(tag: string, count: number): Promise<{ uri: string; disk: string; ids: string[] }> {
  const uri = `s3://${await newBucket(s3.endpoint)}/repo`;
  await initRepo(uri, 'objects');
  const disk = join(dir, `${tag}.raw`);
  await makeRaw(disk, 8 * MiB, [[0, 8 * MiB]]);
  const ids: string[] = [];
  for (let i = 0; i < count; i++) {
    if (i > 0) await scribble(disk, [i - 1]);
    ids.push(await backupOf(uri, 'vm', disk));
  }
  return { uri, disk, ids };
}

async function listIds(uri: string): Promise<string[]> {
  return (JSON.parse(ok(await vhdvaultAsync('list', uri, 'vm', '--json')).stdout) as { backups: Array<{ id: string }> }).backups.map((b) => b.id);
}

/** The local cache's files for a repository's disk vm. */
async function cacheFolder(uri: string): Promise<string> {
  const repo = await Repository.open(uri);
  // As blockObjects.ts names it: per repository (URI and creation time).
  const repoId = createHash('sha256').update(`${repo.root}\0${repo.config.createdAt}`).digest('hex').slice(0, 16);
  return join(cache, 'maps', repoId, 'vm');
}

interface VerifyJson {
  ok: boolean;
  problems: Array<{ id: string | null; block: number | null; problem: string }>;
}

describe.concurrent('messages of an S3 repository', () => {
  it('verify: a missing block object is said to be named by each backup whose map names it, not by the first', async () => {
    const { uri, ids } = await chain('named', 3);
    const repo = await Repository.open(uri);
    const maps = await Promise.all(ids.map(async (id) => loadBlockMap(repo, await repo.backup('vm', id), { fresh: true })));
    // Block 2 never changed: its object is named by all three maps. Block 0 changed in the second
    // backup: that object is named by the second and third maps only.
    const shared = blockObjectKey('vm', maps[0]!.digest(2));
    const later = blockObjectKey('vm', maps[1]!.digest(0));
    expect(maps[2]!.digest(0).equals(maps[1]!.digest(0))).toBe(true);
    expect(maps[0]!.digest(0).equals(maps[1]!.digest(0))).toBe(false);
    await repo.storage.deleteMany([shared, later]);

    const r = await vhdvaultAsync('verify', uri, 'vm', '--json');
    expect(r.code).toBe(1);
    const report = JSON.parse(r.stdout) as VerifyJson;
    const missing = report.problems.filter((p) => /block object is missing/.test(p.problem));
    // The first backup names the shared object; the second and third name both.
    expect(missing.map((p) => `${ids.indexOf(p.id!)}:${p.block}`).sort()).toEqual(['0:2', '1:0', '1:2', '2:0', '2:2']);
    for (const p of missing) {
      expect(p.problem, JSON.stringify(p)).toContain(`named by backup ${p.id})`);
      expect(p.problem).toContain(repo.storage.describe(blockObjectKey('vm', maps[ids.indexOf(p.id!)]!.digest(p.block!))));
    }
    const text = await vhdvaultAsync('verify', uri, 'vm');
    for (const line of expectLines(text.stderr)) {
      const id = /backup (\S+) block/.exec(line)?.[1];
      expect(line).toContain(`(named by backup ${id})`);
    }
  });

  it('an unparseable metadata object is said to be invalid, with why, on one line: never missing, nor its backup absent', async () => {
    const { uri, disk, ids } = await chain('invalid', 3);
    const [, middle, top] = ids as [string, string, string];
    const repo = await Repository.open(uri);
    const where = repo.storage.describe(repo.metadataKey('vm', middle));
    // A control character first (V8 quotes a piece of the text in its message) and a line break.
    await repo.storage.put(repo.metadataKey('vm', middle), '\u0001\n{"format": 1,');
    const invalid = new RegExp(`${where.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: is not valid JSON \\(Unexpected token '\\\\u0001'\\)`);
    const notMissing = (s: string) => {
      expect(s).not.toMatch(/is missing|not in the repository|belongs to no listed backup/);
    };

    const list = await vhdvaultAsync('list', uri, 'vm');
    expect(list.code).toBe(0);
    expect(list.stderr).toMatch(invalid);
    expect(list.stderr).toContain(`backup ${top}: its parent backup ${middle} cannot be read`);
    notMissing(list.stderr);
    expectLines(list.stderr);

    const verify = await vhdvaultAsync('verify', uri, 'vm');
    expect(verify.code).toBe(1);
    expect(verify.stderr).toMatch(invalid);
    notMissing(verify.stderr);
    expectLines(verify.stderr);

    const prune = await vhdvaultAsync('prune', uri, 'vm', '--keep-last', '1');
    expect(prune.code).toBe(1);
    expect(prune.stderr).toMatch(invalid);
    notMissing(prune.stderr);
    expect(expectLines(prune.stderr)).toHaveLength(1);

    expectRefused(await vhdvaultAsync('restore', uri, 'vm', join(dir, 'invalid.raw'), '--backup', middle), where, /is not valid JSON \(Unexpected token/);

    // The next backup cannot build on the top backup's chain, and says which file stops it and why.
    const backup = ok(await vhdvaultAsync('backup', uri, 'vm', '--source', disk));
    expect(backup.stderr).toMatch(/taking a full backup/);
    expect(backup.stderr).toContain(`its parent backup ${middle} cannot be read`);
    expect(backup.stderr).toMatch(invalid);
    notMissing(backup.stderr);
  });

  it('a corrupt local map cache is ignored and replaced: the next backup is a delta, prune runs, nothing is blamed on the store', async () => {
    const { uri, disk, ids } = await chain('cache', 3);
    // Fill the cache with every backup's map (restores in this process use the same cache).
    const filling = await Repository.open(uri);
    for (const id of ids) await restore(filling, 'vm', join(dir, `cache-${id}.raw`), { backup: id });
    const folder = await cacheFolder(uri);
    const entry = (id: string) => join(folder, `${id}.digests`);
    const [first, second, top] = ids as [string, string, string];
    // Damaged three ways: wrong bytes of the right size, a truncated file, a folder in a file's place.
    const bytes = await readFile(entry(top));
    bytes.fill(0xa5, 0, 40);
    await writeFile(entry(top), bytes);
    await writeFile(entry(second), bytes.subarray(0, 10));
    await rm(entry(first));
    await mkdir(join(entry(first), 'inside'), { recursive: true });

    const verify = ok(await vhdvaultAsync('verify', uri, 'vm'));
    expect(verify.stderr).toBe('');
    await scribble(disk, [3]);
    const backup = ok(await vhdvaultAsync('backup', uri, 'vm', '--source', disk, '--json'));
    expect(backup.stderr).toBe('');
    expect(JSON.parse(backup.stdout)).toMatchObject({ kind: 'delta', parent: top });
    const newest = (JSON.parse(backup.stdout) as { id: string }).id;

    // Every entry read since is the store's map again, a file, and no temporary file is left.
    const repo = await Repository.open(uri);
    for (const id of ids) {
      const info = await lstat(entry(id));
      expect(info.isFile(), `${entry(id)} is a file again`).toBe(true);
      expect((await readFile(entry(id))).equals(await repo.storage.get(repo.digestsKey('vm', id)))).toBe(true);
    }
    expect((await readdir(folder)).filter((n) => n.endsWith('.tmp'))).toEqual([]);

    const prune = ok(await vhdvaultAsync('prune', uri, 'vm', '--keep-last', '1'));
    expect(prune.stderr).toBe('');
    expect(prune.stdout).toContain('merged: 3');
    expect(await listIds(uri)).toEqual([newest]);
    ok(await vhdvaultAsync('verify', uri, 'vm'));
  });

  it("prune: a parent's metadata failing to load at the merge's commit stops prune with one line, it prints what it did, and a rerun finishes", async () => {
    const { uri, ids } = await chain('fault', 4);
    const [a, b, c, d] = ids as [string, string, string, string];
    const bucket = /^s3:\/\/([^/]+)\//.exec(uri)![1]!;
    // Prune reads b.json once to plan; every later GET of it (the second merge's commit) fails, retries included.
    let gets = 0;
    const proxy = await startFaultProxy(s3.endpoint, { fail: (method, path) => method === 'GET' && path === `/${bucket}/repo/disks/vm/${b}.json` && ++gets > 1 });
    let prune: CliResult;
    try {
      // keep-last 2: a is merged into b, then b into c.
      prune = await vhdvaultAsync('prune', uri, 'vm', '--keep-last', '2', '--endpoint', proxy.endpoint);
    } finally {
      await proxy.close();
    }
    expect(gets).toBeGreaterThan(1);
    expect(prune.code, prune.stderr).toBe(1);
    const [line] = expectLines(prune.stderr);
    expect(expectLines(prune.stderr)).toHaveLength(1);
    expect(line).toContain(`the merge of backup ${b} into ${c} is interrupted`);
    expect(line).toContain(`${b}.json: server error 500`);
    // What it did, it says: the first merge, and only that.
    expect(prune.stdout).toContain(`remove  vm  ${a}`);
    expect(prune.stdout).toContain(`merge   vm  ${a} into ${b}`);
    expect(prune.stdout).not.toContain(`merge   vm  ${b}`);
    expect(prune.stdout).toContain('merged: 1');

    // Straight from the store (list would finish the merge first): a is gone, the second merge's journal waits.
    const repo = await Repository.open(uri);
    expect((await repo.backups('vm')).map((m) => m.id)).not.toContain(a);
    expect(await repo.storage.head('disks/vm/merge.json')).not.toBeNull();

    const rerun = ok(await vhdvaultAsync('prune', uri, 'vm', '--keep-last', '2'));
    expect(rerun.stderr).toBe('');
    expect(await listIds(uri)).toEqual([c, d]);
    expect(await repo.storage.head('disks/vm/merge.json')).toBeNull();
    ok(await vhdvaultAsync('verify', uri, 'vm'));
  });

  it("a backup whose latest backup's metadata the store fails to give fails with one line: it never builds on an older parent", async () => {
    const { uri, disk, ids } = await chain('latest', 2);
    const bucket = /^s3:\/\/([^/]+)\//.exec(uri)![1]!;
    const latest = ids[1]!;
    const proxy = await startFaultProxy(s3.endpoint, { fail: (method, path) => method === 'GET' && path === `/${bucket}/repo/disks/vm/${latest}.json` });
    let r: CliResult;
    try {
      await scribble(disk, [3]);
      r = await vhdvaultAsync('backup', uri, 'vm', '--source', disk, '--endpoint', proxy.endpoint);
    } finally {
      await proxy.close();
    }
    expectRefused(r, `${latest}.json`, /server error 500 after \d+ attempts/);
    expect(await listIds(uri)).toEqual(ids);
  });
});
