// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
/**
 * An S3 repository as a careful user meets it, through the built CLI against
 * the test S3 server (one fresh bucket per test): init and its refusals, a
 * flaky link and one that breaks mid-backup, two writers, serve, a job run,
 * exports to VHD, the commands that need a folder, and a lost block object.
 * Two writers also on Ceph's RADOS Gateway (helpers/s3.ts: s3Engines), whose
 * conditional writes are real.
 */
import { execFile } from 'node:child_process';
import { copyFile, readdir, writeFile } from 'node:fs/promises';
import { createServer, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { type CliResult, expectRefused, vhdvaultAsync } from './helpers/cli.js';
import { startFaultProxy } from './helpers/faultProxy.js';
import { makeRaw, sameBytes, tempDir } from './helpers/files.js';
import { vhdvaultMeasured } from './helpers/nbdTools.js';
import { scribble } from './helpers/pruneChain.js';
import { newBucket, s3Engines, s3Env } from './helpers/s3.js';
import { startServe } from './helpers/serve.js';
import { openStorage } from '../src/storage/open.js';
import { key } from '../src/storage/Storage.js';
import { blockObjectKey, loadBlockMap } from '../src/store/layouts/blockObjects.js';
import { Repository } from '../src/store/repository.js';
import { expectEncrypted, useTestPassword } from './helpers/store.js';

const run = promisify(execFile);
const MiB = 1024 * 1024;
const SIZE = 8 * MiB;

const dir = await tempDir('vhdvault-s3cli-');
const engines = s3Engines();
// s3rver, the server of every test here; the helper stops the engines' servers after the file.
const s3 = await engines.find((e) => e.name === 's3rver')!.server();
// CLI children inherit this environment (helpers/cli.ts): the test server, the standard AWS way.
Object.assign(process.env, s3Env(s3.endpoint), { VHDVAULT_CACHE_DIR: join(dir, 'cache') });
// The encrypted repository's password (VHDVAULT_PASSWORD), for this process and every CLI it starts.
useTestPassword();

/** `s3://<a new bucket>/repo` on the server at `endpoint`, not initialised. */
async function location(endpoint = s3.endpoint): Promise<string> {
  return `s3://${await newBucket(endpoint)}/repo`;
}

function ok(r: CliResult): CliResult {
  expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0);
  return r;
}

/** Exit 2, one line, no stack: what a mistyped command line gets. */
function expectUsage(r: CliResult, problem: RegExp): void {
  const context = `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
  expect(r.code, context).toBe(2);
  expect(r.stderr, context).not.toContain('    at ');
  expect(r.stderr.trimEnd().split('\n'), context).toHaveLength(1);
  expect(r.stderr, context).toMatch(problem);
}

let timed = 0;
/** The CLI with `env` added, never blocking this process (the fault proxy answers here); also says how long it took. */
function vhdvaultEnv(env: NodeJS.ProcessEnv, ...args: string[]) {
  return vhdvaultMeasured(env, join(dir, `run-${timed++}.time`), ...args);
}

/** A raw disk of random data, so that no two blocks share an object. */
async function newDisk(name: string, size = SIZE): Promise<string> {
  const path = join(dir, `${name}.raw`);
  await makeRaw(path, size, [[0, size]]);
  return path;
}

/** A copy of the disk as it is now, to compare a restore with. */
async function snapshot(disk: string, tag: string): Promise<string> {
  const copy = `${disk}-${tag}`;
  await copyFile(disk, copy);
  return copy;
}

/** A backup's id from `backup`'s output. */
const idOf = (r: CliResult) => ok(r).stdout.trim();

/** A port nothing listens on (just released by us). */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Poll `check` until it holds. */
async function until(check: () => Promise<boolean>, what: string, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** Block objects of disk vm, read through the store's API (straight to the server). */
async function blockObjects(repo: Repository): Promise<number> {
  let n = 0;
  for await (const _ of repo.storage.listAll(repo.blocksKey('vm'))) n++;
  return n;
}

/** Distinct non-zero digests the maps of disk vm's listed backups name, read from the store (not the cache). */
async function namedObjects(repo: Repository): Promise<number> {
  const named = new Set<string>();
  for (const meta of await repo.backups('vm')) {
    const map = await loadBlockMap(repo, meta, { fresh: true });
    for (let b = 0; b < map.blockCount; b++) if (map.hasObject(b)) named.add(map.digest(b).toString('hex'));
  }
  return named.size;
}

async function listIds(uri: string, ...endpoint: string[]): Promise<string[]> {
  return (JSON.parse(ok(await vhdvaultAsync('list', uri, 'vm', '--json', ...endpoint)).stdout) as { backups: Array<{ id: string }> }).backups.map((b) => b.id);
}

// Side by side: each test has its own bucket and files, and their waits (a throttled writer, retries) overlap.
describe.concurrent('an S3 repository through the CLI', () => {
  it('init: makes the objects layout once; refuses a used prefix, folder layouts, a missing bucket, bad URIs and endpoints', async () => {
    const bucket = await newBucket(s3.endpoint);
    const repo = `s3://${bucket}/p`;
    expect(ok(await vhdvaultAsync('init', repo)).stdout).toMatch(/layout objects/);
    // Something under a prefix that is no repository: a user's data, never adopted.
    const other = await openStorage({ kind: 's3', bucket, prefix: 'other' });
    await other.put('notes/readme.txt', 'mine\n');
    const missing = `s3://no-such-${bucket}/p`;
    const wrong = `http://127.0.0.1:${await closedPort()}`;
    const [again, used, wholeBucket, dirLayout, vhdLayout, noBucket, unreachable, overridden, notUrl, ...malformed] = await Promise.all([
      vhdvaultAsync('init', repo),
      vhdvaultAsync('init', `s3://${bucket}/other`),
      vhdvaultAsync('init', `s3://${bucket}`),
      vhdvaultAsync('init', `s3://${bucket}/q`, '--layout', 'dir'),
      vhdvaultAsync('init', `s3://${bucket}/q`, '--layout', 'vhd'),
      vhdvaultAsync('init', missing),
      // Few attempts: refused connections are retried with backoff, and a user should not wait long to hear it.
      vhdvaultEnv({ VHDVAULT_S3_ATTEMPTS: '2' }, 'init', `s3://${bucket}/far`, '--endpoint', wrong),
      vhdvaultEnv({ AWS_ENDPOINT_URL: wrong, AWS_ENDPOINT_URL_S3: wrong }, 'init', `s3://${bucket}/near`, '--endpoint', s3.endpoint),
      vhdvaultAsync('init', `s3://${bucket}/x`, '--endpoint', 'not-a-url'),
      vhdvaultAsync('init', 's3://'),
      vhdvaultAsync('init', 's3://UPPER/x'),
      vhdvaultAsync('init', `s3://${bucket}/../x`),
    ]);
    expectRefused(again, repo, /already a vhdvault repository/);
    // A repository's prefixes are its own: no second repository inside it.
    expectRefused(await vhdvaultAsync('init', `${repo}/disks/inner`), `${repo}/disks/inner`, /is inside the repository/);
    expectRefused(used, `s3://${bucket}/other`, /not empty/);
    expectRefused(wholeBucket, `s3://${bucket}`, /not empty/);
    expectUsage(dirLayout, /objects layout/);
    expectUsage(vhdLayout, /objects layout/);
    expectRefused(noBucket, missing, /does not exist/);
    expectRefused(unreachable, `s3://${bucket}/far`, /cannot reach/);
    // Seconds even on a loaded machine (a Node start included); a hang would be retries of 30 s timeouts.
    expect(unreachable.elapsedMs).toBeLessThan(20_000);
    ok(overridden);
    expect((await Repository.open(`s3://${bucket}/near`)).config.layout).toBe('objects');
    expectUsage(notUrl, /--endpoint not-a-url/);
    for (const r of malformed) expectUsage(r, /s3:\/\//);
    // Nothing was made where init refused.
    expect(await other.list('')).toEqual(['notes']);
    expect(await (await openStorage({ kind: 's3', bucket, prefix: 'q' })).list('')).toEqual([]);
  });

  it('through a flaky link (500s, stalls) backup, delta, restore, verify and prune succeed; a backup cut off fails alone, and prune collects what it uploaded', async () => {
    const repo = await location();
    ok(await vhdvaultAsync('init', repo));
    const proxy = await startFaultProxy(s3.endpoint, { errorRate: 0.2, stallRate: 0.03, seed: 7, maxInARow: 4 });
    try {
      // A short timeout so that stalls cost little, but not so short that a loaded machine's s3rver misses it
      // (1.5 s once failed a 2 MiB PUT 8 times over at load 10); attempts enough that a 1-in-5 failure rate never exhausts them.
      const flaky = (...args: string[]) => vhdvaultEnv({ VHDVAULT_S3_TIMEOUT_MS: '4000', VHDVAULT_S3_ATTEMPTS: '8' }, ...args, '--endpoint', proxy.endpoint);
      const disk = await newDisk('flaky');
      const full = idOf(await flaky('backup', repo, 'vm', '--source', disk));
      const atFull = await snapshot(disk, full);
      await scribble(disk, [1, 2]);
      const delta = idOf(await flaky('backup', repo, 'vm', '--source', disk));
      const atDelta = await snapshot(disk, delta);
      // Readers all: side by side.
      const outs = [full, delta].map((id) => join(dir, `flaky-${id}.raw`));
      const read = await Promise.all([...[full, delta].map((id, i) => flaky('restore', repo, 'vm', outs[i]!, '--backup', id)), flaky('verify', repo)]);
      read.forEach(ok);
      expect(await sameBytes(outs[0]!, atFull)).toBe(true);
      expect(await sameBytes(outs[1]!, atDelta)).toBe(true);
      const pruned = JSON.parse(ok(await flaky('prune', repo, '--keep-last', '1', '--json')).stdout) as { merged: number; collected: { objects: number } };
      // The full's blocks 1 and 2, which the delta replaced, are no backup's any more.
      expect(pruned).toMatchObject({ merged: 1, collected: { objects: 2 } });
      expect(proxy.stats.errors).toBeGreaterThan(0);
      console.log(`flaky link: ${JSON.stringify(proxy.stats)}`);

      // The link breaks for good once the next backup has uploaded something.
      await scribble(disk, [0, 1, 2, 3]);
      const store = await Repository.open(repo);
      const before = await blockObjects(store);
      expect(before).toBe(await namedObjects(store));
      proxy.setFaults({ errorRate: 0 });
      // Two attempts: its failure comes fast once every request fails.
      const cut = vhdvaultEnv({ VHDVAULT_S3_ATTEMPTS: '2' }, 'backup', repo, 'vm', '--source', disk, '--max-write', '2M', '--endpoint', proxy.endpoint);
      await until(async () => (await blockObjects(store)) > before, 'a first block object of the backup');
      proxy.setFaults({ errorRate: 1 });
      expectRefused(await cut, repo, /server error 500/);
      const uploaded = (await blockObjects(store)) - before;

      // Straight to the server: the backup kept restores exactly and verifies; the broken one left only garbage.
      const after = join(dir, 'flaky-after.raw');
      const [ids] = await Promise.all([listIds(repo), vhdvaultAsync('restore', repo, 'vm', after).then(ok), vhdvaultAsync('verify', repo).then(ok)]);
      expect(ids).toEqual([delta]);
      expect(await sameBytes(after, atDelta)).toBe(true);
      const collected = JSON.parse(ok(await vhdvaultAsync('prune', repo, '--keep-last', '1', '--json')).stdout) as { collected: { objects: number } };
      expect(collected.collected.objects).toBe(uploaded);
      expect(await blockObjects(store)).toBe(await namedObjects(store));
    } finally {
      await proxy.close();
    }
  });

  for (const engine of engines) {
    it.skipIf(engine.skip !== undefined)(`two writers (${engine.title}): a second backup of a disk whose backup is running is refused at once, and only the first is listed`, async () => {
      // Each engine's repository names its endpoint: the engines' tests run side by side in one environment.
      const { endpoint } = await engine.server();
      const at = ['--endpoint', endpoint];
      const repo = await location(endpoint);
      ok(await vhdvaultAsync('init', repo, ...at));
      const disk = await newDisk(`writers-${engine.name}`, 16 * MiB);
      let firstDone = false;
      const first = vhdvaultAsync('backup', repo, 'vm', '--source', disk, '--max-write', '2M', ...at).finally(() => (firstDone = true));
      const r = await Repository.open({ root: repo, endpoint });
      const lock = key(r.diskKey('vm'), 'lock');
      await until(async () => (await r.storage.head(lock)) !== null, 'the lock object');
      expectRefused(await vhdvaultAsync('backup', repo, 'vm', '--source', disk, ...at), `${repo}/disks/vm`, /is locked by/);
      expect(firstDone).toBe(false);
      const id = idOf(await first);
      expect(await listIds(repo, ...at)).toEqual([id]);
    });
  }

  it('serve exports the latest backup read-only over NBD, read back exactly by nbdcopy; --writable is refused', async () => {
    const repo = await location();
    ok(await vhdvaultAsync('init', repo));
    const disk = await newDisk('serve');
    const id = idOf(await vhdvaultAsync('backup', repo, 'vm', '--source', disk));
    // An overlay's VHD names the backup's VHD file as its parent: there is none on an object store.
    expectRefused(await vhdvaultAsync('serve', repo, 'vm', '--writable', '--socket', join(dir, 'writable.sock')), repo, /--writable.*object store/);
    const serving = await startServe(repo, 'vm', '--socket', join(dir, 'serve.sock'));
    try {
      expect(serving.ready).toMatchObject({ backup: id, writable: false });
      const out = join(dir, 'served.raw');
      await run('nbdcopy', [serving.uri, out]);
      expect(await sameBytes(out, disk)).toBe(true);
    } finally {
      expect(await serving.stop()).toBe(0);
    }
  });

  it('job run backs up into an s3:// repository, and job history shows the run', async () => {
    const repo = await location();
    ok(await vhdvaultAsync('init', repo));
    const disk = await newDisk('job');
    const jobFile = join(dir, 'to-s3.yaml');
    await writeFile(jobFile, `name: to-s3\nschedule: "0 3 * * *"\nrepository: ${repo}\ndisks:\n  - name: vm\n    source: ${disk}\nverify: new\n`);
    ok(await vhdvaultAsync('job', 'run', jobFile));
    const ids = await listIds(repo);
    expect(ids).toHaveLength(1);
    const history = JSON.parse(ok(await vhdvaultAsync('job', 'history', repo, '--json')).stdout) as { runs: Array<{ job: string; ok: boolean; disks: Array<{ disk: string; id?: string }> }> };
    expect(history.runs).toHaveLength(1);
    expect(history.runs[0]).toMatchObject({ job: 'to-s3', ok: true, disks: [{ disk: 'vm', id: ids[0] }] });
  });

  it('vhd convert exports a backup to a VHD directory and a VHD file, restore to a fixed VHD: each reads back as the disk; vhd info and check read the backup', async () => {
    const repo = await location();
    ok(await vhdvaultAsync('init', repo));
    const disk = await newDisk('export');
    const id = idOf(await vhdvaultAsync('backup', repo, 'vm', '--source', disk));
    const backup = `${repo}/disks/vm/${id}`;
    const exploded = join(dir, 'out.vhd-dir');
    const file = join(dir, 'out.vhd');
    const fixed = join(dir, 'fixed.vhd');
    (
      await Promise.all([
        vhdvaultAsync('vhd', 'convert', backup, exploded),
        vhdvaultAsync('vhd', 'convert', backup, file),
        vhdvaultAsync('restore', repo, 'vm', fixed, '--format', 'fixed'),
      ])
    ).forEach(ok);
    ok(await vhdvaultAsync('vhd', 'check', exploded));
    // The backup itself, read through its repository as restore reads it.
    expect(ok(await vhdvaultAsync('vhd', 'check', backup)).stdout).toMatch(/: ok \(dynamic, \d+ bytes\)/);
    expect(JSON.parse(ok(await vhdvaultAsync('vhd', 'info', backup, '--json')).stdout)).toMatchObject({ path: backup, type: 'dynamic' });
    const back = join(dir, 'back.raw');
    ok(await vhdvaultAsync('vhd', 'convert', exploded, back));
    expect(await sameBytes(back, disk)).toBe(true);
    // qemu-img exits 1 on a difference (execFile rejects).
    await Promise.all([file, fixed].map((vhd) => run('qemu-img', ['compare', '-q', '-f', 'vpc', '-F', 'raw', vhd, disk])));
  });

  it('refuses with one line what needs a repository folder: direct-mode live backup and replication', async () => {
    const repo = await location();
    ok(await vhdvaultAsync('init', repo));
    const folder = join(dir, 'folder-repo');
    ok(await vhdvaultAsync('init', folder));
    const [direct, out, into] = await Promise.all([
      vhdvaultAsync('backup', repo, 'vm', '--qemu', '/nonexistent.sock', '--node', 'x'),
      vhdvaultAsync('replicate', repo, folder),
      vhdvaultAsync('replicate', folder, repo),
    ]);
    expectRefused(direct, repo, /direct mode.*--fleecing/);
    expectRefused(out, repo, /object store/);
    expectRefused(into, repo, /object store/);
  });

  // Also in an encrypted repository, where a block object's name is a keyed digest, and bytes damaged
  // in an object fail its authentication.
  for (const encryption of [undefined, 'aes-256-gcm'] as const) {
    const tag = encryption ? `-${encryption}` : '';
    it(`a lost block object${encryption ? ` (encrypted with ${encryption})` : ''}: verify names the backup and block, restore fails with one line and leaves no output`, async () => {
      const repo = await location();
      ok(await vhdvaultAsync('init', repo, ...(encryption ? ['--encryption', encryption] : [])));
      const disk = await newDisk(`damage${tag}`);
      const id = idOf(await vhdvaultAsync('backup', repo, 'vm', '--source', disk));
      const r = await Repository.open(repo);
      const map = await loadBlockMap(r, await r.backup('vm', id), { fresh: true });
      await r.storage.delete(blockObjectKey('vm', map.digest(2)));
      if (encryption) await expectEncrypted(repo);
      // Names no other test's output contains (the tests run side by side).
      const outName = encryption ? 'lost-sealed' : 'damaged';
      const out = join(dir, `${outName}.raw`);
      const [verified, restored] = await Promise.all([vhdvaultAsync('verify', repo), vhdvaultAsync('restore', repo, 'vm', out)]);
      expect(verified.code, verified.stderr).toBe(1);
      expect(verified.stderr).toContain(`backup ${id} block 2`);
      expect(verified.stderr).not.toContain('    at ');
      expectRefused(restored, repo, /missing/);
      expect((await readdir(dir)).filter((name) => name.includes(outName))).toEqual([]);
      // The next backup does not name the lost object again: it is full, says why, and stores the block anew.
      const next = JSON.parse(ok(await vhdvaultAsync('backup', repo, 'vm', '--source', disk, '--json')).stdout) as { id: string; kind: string; note?: string };
      expect(next.kind).toBe('full');
      expect(next.note).toMatch(/block object.*missing/);
      ok(await vhdvaultAsync('verify', repo));
      ok(await vhdvaultAsync('restore', repo, 'vm', out, '--backup', id));
      expect(await sameBytes(out, disk)).toBe(true);
      if (encryption) {
        // A block object's bytes damaged in place (beneath the sealing): it fails authentication, named by backup and block.
        const raw = await openStorage(r.storage.descriptor);
        const victim = blockObjectKey('vm', map.digest(3));
        const sealed = await raw.get(victim);
        const damaged = Buffer.from(sealed);
        damaged[100]! ^= 0xa5;
        await raw.put(victim, damaged);
        const [v, restored] = await Promise.all([vhdvaultAsync('verify', repo), vhdvaultAsync('restore', repo, 'vm', join(dir, 'flipped-sealed.raw'), '--backup', id)]);
        expect(v.code, v.stderr).toBe(1);
        expect(v.stderr).toMatch(new RegExp(`backup ${id} block 3: .*${victim.split('/').at(-1)}: authentication failed`));
        expect(v.stderr).not.toContain('    at ');
        expectRefused(restored, repo, /authentication failed/);
        expect((await readdir(dir)).filter((name) => name.includes('flipped-sealed'))).toEqual([]);
        await raw.put(victim, sealed);
      }
      // A map gone from the store is missing, whatever this machine's cache remembers.
      await r.storage.delete(r.digestsKey('vm', next.id));
      expectRefused(await vhdvaultAsync('restore', repo, 'vm', join(dir, `nomap${tag}.raw`), '--backup', next.id), repo, /block map .* is missing/);
    });
  }
});
