// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
/**
 * `vhdvault replicate`: backups sent to a second repository as the blocks they
 * store, both sides pruned with their own policies over many cycles, the
 * source's pin on the newest replicated backup, a destination that lost the
 * common base, and replication killed with SIGKILL. Backups are taken in this
 * process (set-up); replicate, prune, verify and list run the built CLI, and so do
 * the restores that end each scenario (in between, the same restore code runs in
 * this process: a Node start-up per backup per cycle would cost most of the time).
 */
import { spawn } from 'node:child_process';
import { randomInt } from 'node:crypto';
import { readdir, readFile, realpath, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import type { ReplicationReport } from '../src/store/replicate.js';
import { CLI, cliEnv, vhdvault, vhdvaultAsync } from './helpers/cli.js';
import { makeRaw, sha256, tempDir } from './helpers/files.js';
import { BLOCK, scribble, SIZE } from './helpers/pruneChain.js';
import { backupOf, initRepo, listed } from './helpers/store.js';
import { Repository } from '../src/store/repository.js';
import { restore } from '../src/store/restore.js';

const dir = await tempDir();
const BLOCKS = SIZE / BLOCK;

/** A source disk and what it held at each backup: id → SHA-256. */
interface Disk {
  raw: string;
  contents: Map<string, string>;
}

async function newDisk(name: string): Promise<Disk> {
  const raw = join(dir, `${name}.raw`);
  await makeRaw(raw, SIZE, [[0, SIZE - 3 * BLOCK]]); // the last blocks start as holes
  return { raw, contents: new Map() };
}

/** `count` distinct random blocks rewritten, then a backup; resolves to the id. */
async function changeAndBackUp(repo: string, disk: Disk, count: number, full = false): Promise<string> {
  const blocks = new Set<number>();
  while (blocks.size < count) blocks.add(randomInt(BLOCKS));
  await scribble(disk.raw, [...blocks]);
  const id = await backupOf(repo, 'vm', disk.raw, { full });
  disk.contents.set(id, await sha256(disk.raw));
  return id;
}

function replicateJson(...args: string[]): ReplicationReport {
  const r = vhdvault('replicate', ...args, '--json');
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as ReplicationReport;
}

async function replicateJsonAsync(...args: string[]): Promise<ReplicationReport> {
  const r = await vhdvaultAsync('replicate', ...args, '--json');
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as ReplicationReport;
}

function pruneOk(repo: string, ...keep: string[]): string {
  const r = vhdvault('prune', repo, ...keep);
  expect(r.code, r.stderr).toBe(0);
  return r.stderr;
}

/** The ids `vhdvault list <repo> vm` lists (none before the disk's first backup). */
async function ids(repo: string): Promise<string[]> {
  return (await listed(repo, 'vm').catch(() => [])).map((b) => b.id);
}

/**
 * Every backup listed in `repo` restores to exactly what the disk held at that
 * backup. Through the CLI when `cli`; otherwise through the same restore code in
 * this process, which spares a Node start-up per backup in the cycles.
 */
async function expectRestores(repo: string, disk: Disk, options: { cli?: boolean } = {}): Promise<string[]> {
  const listedIds = await ids(repo);
  const outs = listedIds.map((id) => join(dir, `check-${id}-${Math.random().toString(16).slice(2)}.raw`));
  const restoreOne = async (id: string, out: string) => {
    if (options.cli) return vhdvaultAsync('restore', repo, 'vm', out, '--backup', id);
    return restore(await Repository.open(repo), 'vm', out, { backup: id }).then(
      () => ({ code: 0, stderr: '' }),
      (err: unknown) => ({ code: 1, stderr: String(err) }),
    );
  };
  const runs = await Promise.all(listedIds.map((id, i) => restoreOne(id, outs[i]!)));
  for (const [i, id] of listedIds.entries()) {
    expect(runs[i]!.code, `${repo} ${id}: ${runs[i]!.stderr}`).toBe(0);
    expect(disk.contents.has(id), `${repo} lists ${id}, which no backup made`).toBe(true);
    expect(await sha256(outs[i]!), `${repo} backup ${id}`).toBe(disk.contents.get(id));
    await rm(outs[i]!);
  }
  return listedIds;
}

describe('replicate over many cycles, each side pruned with its own policy', () => {
  it('to a dir repository (block files sent as stored) and a vhd one (blocks re-encoded): every backup on every side restores', async () => {
    const src = join(dir, 'cycles-src');
    // Two destinations with their own layouts and policies: the source keeps a pin for each.
    const destinations = [
      { root: join(dir, 'cycles-dir'), layout: 'dir' as const, keep: ['--keep-last', '3', '--keep-hourly', '2'], most: 4 }, // one more when the run crosses an hour
      { root: join(dir, 'cycles-vhd'), layout: 'vhd' as const, keep: ['--keep-last', '2'], most: 2 },
    ];
    await initRepo(src, 'dir');
    for (const d of destinations) await initRepo(d.root, d.layout);
    const disk = await newDisk('cycles');
    for (let cycle = 0; cycle < 8; cycle++) {
      const changed = 1 + randomInt(3);
      // A full now and then starts a new chain at the source, sent as it is.
      const id = await changeAndBackUp(src, disk, changed, cycle === 5);
      const { bytesStored } = JSON.parse(await readFile(join(src, 'disks', 'vm', `${id}.json`), 'utf8')) as { bytesStored: number };
      // Both at once: two readers of the source, each holding its own destination's lock.
      const reports = await Promise.all(destinations.map((d) => replicateJsonAsync(src, d.root, ...d.keep)));
      for (const [i, d] of destinations.entries()) {
        const vm = reports[i]!.disks[0]!;
        expect(vm.error).toBeUndefined();
        expect(vm.common).toBe(id);
        expect(vm.copied.map((c) => c.id)).toEqual([id]);
        const copy = vm.copied[0]!;
        if (cycle === 0) {
          expect(copy).toMatchObject({ how: 'full', reason: expect.stringMatching(/first replication/) });
        } else if (cycle === 5) {
          expect(copy.how).toBe('full');
          expect(copy.reason).toBeUndefined(); // the source's own full, not a fallback
        } else {
          // Only the blocks the delta stores were sent (and its digests): what it occupies at the source.
          expect(copy).toMatchObject({ how: 'delta', blocks: changed });
          expect(copy.bytesSent).toBeGreaterThanOrEqual(changed * BLOCK);
          expect(copy.bytesSent).toBeLessThan((changed + 1) * BLOCK);
          if (d.layout === 'dir') expect(Math.abs(copy.bytesSent - bytesStored)).toBeLessThan(4096);
          else expect(Math.abs(copy.bytesSent - bytesStored)).toBeLessThan(64 * 1024);
        }
      }
      pruneOk(src, '--keep-last', '2');
      // The CLI restores at the last cycle; before, the same restore code in this process.
      const cli = cycle === 7;
      const [srcIds, ...dstIds] = await Promise.all([src, ...destinations.map((d) => d.root)].map((root) => expectRestores(root, disk, { cli })));
      expect(srcIds!.at(-1)).toBe(id);
      expect(srcIds!.length).toBeLessThanOrEqual(2);
      for (const [i, d] of destinations.entries()) {
        expect(dstIds[i]!.at(-1)).toBe(id);
        expect(dstIds[i]!.length).toBeLessThanOrEqual(d.most);
      }
    }
    const roots = [src, ...destinations.map((d) => d.root)];
    for (const [i, verify] of (await Promise.all(roots.map((root) => vhdvaultAsync('verify', root)))).entries()) {
      expect(verify.code, `${roots[i]}: ${verify.stdout}${verify.stderr}`).toBe(0);
    }
  });
});

describe("the source's pin on the newest replicated backup", () => {
  it('prune keeps it although its policy removes it, says so, and lets it go once a newer one is replicated', async () => {
    const src = join(dir, 'pin-src');
    const dst = join(dir, 'pin-dst');
    await initRepo(src, 'dir');
    await initRepo(dst, 'vhd');
    const disk = await newDisk('pin');
    await changeAndBackUp(src, disk, 2);
    const pinned = await changeAndBackUp(src, disk, 2);
    expect(replicateJson(src, dst).disks[0]!.common).toBe(pinned);
    await changeAndBackUp(src, disk, 1);
    const newest = await changeAndBackUp(src, disk, 1);
    const warning = pruneOk(src, '--keep-last', '1');
    expect(warning).toContain(`backup ${pinned}: kept although the policy removes it: it is the newest backup replicated to ${await realpath(dst)}`);
    expect((await listed(src, 'vm')).map((b) => b.id)).toEqual([pinned, newest]);
    // The next replication builds on it: a delta.
    const vm = replicateJson(src, dst).disks[0]!;
    expect(vm.copied).toMatchObject([{ id: newest, how: 'delta' }]);
    expect(vm.common).toBe(newest);
    expect(pruneOk(src, '--keep-last', '1')).not.toContain('kept although');
    expect((await listed(src, 'vm')).map((b) => b.id)).toEqual([newest]);
    await Promise.all([expectRestores(src, disk), expectRestores(dst, disk, { cli: true })]);
  });
});

describe('a destination that lost the common base', () => {
  it('gets a full copy, and the report says why', async () => {
    const src = join(dir, 'lost-src');
    const dst = join(dir, 'lost-dst');
    await initRepo(src, 'dir');
    await initRepo(dst, 'dir');
    const disk = await newDisk('lost');
    await changeAndBackUp(src, disk, 2);
    await changeAndBackUp(src, disk, 2);
    const first = replicateJson(src, dst);
    expect(first.disks[0]!.copied).toMatchObject([{ how: 'full' }]);

    // Its disk folder deleted: the source's pin still names what it held.
    await rm(join(dst, 'disks', 'vm'), { recursive: true });
    const next = await changeAndBackUp(src, disk, 1);
    const human = vhdvault('replicate', src, dst);
    expect(human.code, human.stderr).toBe(0);
    expect(human.stdout).toMatch(new RegExp(`^vm: 1 copied \\(0 delta, 1 full\\).*full ${next}: the destination no longer holds \\S+, the last backup replicated to it`, 'm'));
    expect((await listed(dst, 'vm')).map((b) => b.id)).toEqual([next]);

    // Now its newest (the common) backup deleted by hand, older ones kept: the source's pin is provably
    // stale, so the source's prune drops it and its backups; nothing is in common any more.
    const older = await changeAndBackUp(src, disk, 1);
    const lost = await changeAndBackUp(src, disk, 1);
    expect(replicateJson(src, dst).disks[0]!.copied).toMatchObject([{ id: older, how: 'delta' }, { id: lost, how: 'delta' }]);
    for (const name of await readdir(join(dst, 'disks', 'vm'))) if (name.startsWith(lost)) await rm(join(dst, 'disks', 'vm', name), { recursive: true });
    const latest = await changeAndBackUp(src, disk, 2);
    expect(pruneOk(src, '--keep-last', '1')).not.toContain('kept although');
    expect(await readdir(join(src, 'replicas', 'vm'))).toEqual([]); // the stale pin went with it
    expect((await listed(src, 'vm')).map((b) => b.id)).toEqual([latest]);
    const vm = replicateJson(src, dst).disks[0]!;
    expect(vm.copied).toMatchObject([{ id: latest, how: 'full', reason: expect.stringMatching(/holds no backup in common with the source/) }]);
    expect((await listed(dst, 'vm')).map((b) => b.id)).toEqual([next, older, latest]);
    await Promise.all([expectRestores(src, disk), expectRestores(dst, disk, { cli: true })]);
    const verify = vhdvault('verify', dst);
    expect(verify.code, verify.stderr).toBe(0);
  });
});

describe('refusals and failures', () => {
  it('refuses the source itself and an uninitialised destination; a missing disk fails alone', async () => {
    const src = join(dir, 'refuse-src');
    const dst = join(dir, 'refuse-dst');
    await initRepo(src, 'dir');
    await initRepo(dst, 'dir');
    const disk = await newDisk('refuse');
    const id = await changeAndBackUp(src, disk, 1);
    const same = vhdvault('replicate', src, `${src}/`);
    expect(same.code).toBe(2);
    expect(same.stderr).toMatch(/is the source repository itself/);
    const none = vhdvault('replicate', src, join(dir, 'refuse-nothing'));
    expect(none.code).toBe(1);
    expect(none.stderr).toMatch(/is not a vhdvault repository.*vhdvault init/);
    const r = vhdvault('replicate', src, dst, 'nosuch', 'vm', '--json');
    expect(r.code).toBe(1);
    const report = JSON.parse(r.stdout) as ReplicationReport;
    expect(report.disks.map((d) => [d.disk, d.error === undefined])).toEqual([['nosuch', false], ['vm', true]]);
    expect(report.disks[0]!.error).toMatch(/has no backups of disk "nosuch"/);
    expect(report.disks[1]!.common).toBe(id);
    expect(r.stderr).toMatch(/vhdvault: nosuch: .*has no backups of disk "nosuch"/);
  });
});

describe('replicate killed with SIGKILL', () => {
  it('leaves the destination valid, listing only whole backups, and the rerun completes', async () => {
    const src = join(dir, 'kill-src');
    const dst = join(dir, 'kill-dst');
    await initRepo(src, 'vhd');
    await initRepo(dst, 'dir');
    const disk = await newDisk('kill');
    await changeAndBackUp(src, disk, 4);
    let interrupted = 0;
    const KILLS = 4;
    for (let k = 0; k < KILLS; k++) {
      // The first round sends a full (6 blocks of data), later ones two deltas of 3 blocks: at 6 MiB/s each
      // takes about 2 s, and the destination's retention merges at the end of the run.
      if (k > 0) for (let i = 0; i < 2; i++) await changeAndBackUp(src, disk, 3);
      const before = await ids(dst);
      const child = spawn(process.execPath, [CLI, 'replicate', src, dst, '--keep-last', '2', '--max-write', '6M'], { stdio: 'ignore', env: cliEnv() });
      const exited = new Promise((resolve) => child.on('exit', resolve));
      await Promise.race([sleep(randomInt(300, 3000)), exited]);
      child.kill('SIGKILL');
      await exited;
      const after = await ids(dst);
      if (after.at(-1) !== (await ids(src)).at(-1)) interrupted++;
      // Only whole backups, each one the source made, and nothing wrong with them.
      if (after.length > 0) {
        const [list, verify] = await Promise.all([vhdvaultAsync('list', dst, '--json'), vhdvaultAsync('verify', dst)]);
        expect(list.code, list.stderr).toBe(0);
        expect(list.stderr).toBe('');
        expect((JSON.parse(list.stdout) as { backups: Array<{ id: string }> }).backups.map((b) => b.id)).toEqual(after);
        for (const id of after) expect(disk.contents.has(id)).toBe(true);
        expect(verify.code, `${verify.stdout}${verify.stderr}`).toBe(0);
      }
      // A destination that had backups keeps some whatever the moment of the kill.
      expect(after.length).toBeGreaterThanOrEqual(Math.min(1, before.length));
      // The rerun takes over the dead process's lock, removes its leftovers and finishes.
      const rerun = replicateJson(src, dst, '--keep-last', '2');
      expect(rerun.disks[0]!.common).toBe((await ids(src)).at(-1));
      await Promise.all([expectRestores(src, disk), expectRestores(dst, disk, { cli: k === KILLS - 1 })]);
      const leftovers = (await readdir(join(dst, 'disks', 'vm'))).filter((n) => n.endsWith('.tmp') || n === 'lock');
      expect(leftovers).toEqual([]);
    }
    // Kills must have landed before the end of some runs, or this proves nothing.
    expect(interrupted, `${interrupted} of ${KILLS} kills interrupted a replication`).toBeGreaterThanOrEqual(2);
  });
});
