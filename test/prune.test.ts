import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { randomBytes, randomInt } from 'node:crypto';
import { copyFile, open, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { CLI, vhdvault } from './helpers/cli.js';
import { makeRaw, sha256, tempDir } from './helpers/files.js';
import { selectRetention } from '../src/store/retention.js';

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;
const SIZE = 16 * MiB;
const dir = await tempDir();

interface Row {
  id: string;
  kind: string;
  parent: string | null;
}

function list(repo: string): Row[] {
  const r = vhdvault('list', repo, 'vm', '--json');
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as Row[];
}

async function scribble(raw: string, blocks: number[]): Promise<void> {
  const fh = await open(raw, 'r+');
  for (const b of blocks) await fh.write(randomBytes(BLOCK), 0, BLOCK, b * BLOCK);
  await fh.close();
}

/** A repository with `count` backups of a changing disk; returns the disk's content per backup id. */
async function makeChain(repo: string, layout: 'dir' | 'vhd', count: number): Promise<Map<string, string>> {
  expect(vhdvault('init', repo, '--layout', layout).code).toBe(0);
  const disk = `${repo}.raw`;
  await makeRaw(disk, SIZE, [[0, SIZE]]);
  const copies = new Map<string, string>();
  for (let i = 0; i < count; i++) {
    if (i > 0) await scribble(disk, [i % 8, (i * 3) % 8]);
    const r = vhdvault('backup', repo, 'vm', '--source', disk);
    expect(r.code, r.stderr).toBe(0);
    const id = r.stdout.trim();
    const copy = `${repo}-${id}.raw`;
    await copyFile(disk, copy);
    copies.set(id, copy);
  }
  return copies;
}

/** Every listed backup restores exactly; the disk folder holds nothing else. */
async function expectSound(repo: string, copies: Map<string, string>): Promise<void> {
  const rows = list(repo);
  for (const row of rows) {
    const out = join(dir, 'check.raw');
    const r = vhdvault('restore', repo, 'vm', out, '--backup', row.id);
    expect(r.code, r.stderr).toBe(0);
    expect(await sha256(out), `backup ${row.id}`).toBe(await sha256(copies.get(row.id)!));
    await rm(out);
  }
  const files = await readdir(join(repo, 'disks', 'vm'));
  expect(files.sort()).toEqual(rows.flatMap((r) => [`${r.id}.digests`, `${r.id}.json`, `${r.id}.${repo.includes('-vhd') ? 'vhd' : 'vhd-dir'}`]).sort());
  expect(rows[0]?.kind).toBe('full');
  expect(rows[0]?.parent).toBeNull();
  rows.slice(1).forEach((r, i) => expect(r.parent).toBe(rows[i]!.id));
}

describe('retention selection (Proxmox Backup Server rules)', () => {
  const at = (id: string, iso: string) => ({ id, createdAt: new Date(iso).toISOString() });
  // Local-time periods: build dates from local components.
  const local = (y: number, m: number, d: number, h = 12) => new Date(y, m - 1, d, h).toISOString();
  const backups = [
    at('a', local(2026, 1, 1, 9)),
    at('b', local(2026, 1, 1, 18)),
    at('c', local(2026, 1, 2, 9)),
    at('d', local(2026, 1, 5, 9)),
    at('e', local(2026, 1, 5, 20)),
    at('f', local(2026, 2, 1, 9)),
  ];
  const kept = (policy: Parameters<typeof selectRetention>[1]) => selectRetention(backups, policy).kept.map((b) => b.id);

  it('keep-last keeps the newest N', () => expect(kept({ last: 2 })).toEqual(['e', 'f']));
  it('keep-daily keeps the newest of each of N days', () => expect(kept({ daily: 3 })).toEqual(['c', 'e', 'f']));
  it('a day already covered by keep-last does not use up keep-daily', () => expect(kept({ last: 1, daily: 2 })).toEqual(['c', 'e', 'f']));
  it('keep-monthly', () => expect(kept({ monthly: 2 })).toEqual(['e', 'f']));
  it('the newest backup is always kept', () => expect(kept({ daily: 0, yearly: 0 })).toEqual(['f']));
  it('older backups of a period an option kept are removed, not kept by a later option', () =>
    // daily keeps e (Jan 5); d is the older one of that day; weekly cannot take it.
    expect(kept({ daily: 1, weekly: 5 })).toEqual(['c', 'f', 'e'].sort()));
});

for (const layout of ['dir', 'vhd'] as const) {
  describe(`prune with merges, layout ${layout}`, () => {
    it('keep-last: kept backups restore exactly, removed ones are gone, the oldest kept becomes the full', async () => {
      const repo = join(dir, `last-${layout}`);
      const copies = await makeChain(repo, layout, 8);
      const ids = [...copies.keys()];
      const dry = vhdvault('prune', repo, '--keep-last', '3', '--dry-run', '--json');
      expect(JSON.parse(dry.stdout)).toMatchObject({ kept: ids.slice(5), removed: ids.slice(0, 5), merged: 5 });
      expect(list(repo).map((r) => r.id)).toEqual(ids); // dry run changed nothing
      const r = vhdvault('prune', repo, '--keep-last', '3', '--json');
      expect(r.code, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout)).toMatchObject({ kept: ids.slice(5), removed: ids.slice(0, 5), merged: 5 });
      expect(list(repo).map((x) => x.id)).toEqual(ids.slice(5));
      await expectSound(repo, copies);
      expect(vhdvault('verify', repo).code).toBe(0);
    });

    it('keep-daily over backups spread across days', async () => {
      const repo = join(dir, `daily-${layout}`);
      const copies = await makeChain(repo, layout, 8);
      const ids = [...copies.keys()];
      // Spread the 8 backups over 4 days, two a day (ids stay in time order).
      for (const [i, id] of ids.entries()) {
        const path = join(repo, 'disks', 'vm', `${id}.json`);
        const meta = JSON.parse(await readFile(path, 'utf8'));
        meta.createdAt = new Date(2026, 0, 10 + Math.floor(i / 2), 8 + (i % 2) * 8).toISOString();
        await writeFile(path, JSON.stringify(meta));
      }
      const r = vhdvault('prune', repo, '--keep-daily', '2', '--json');
      expect(r.code, r.stderr).toBe(0);
      // The newest of each of the last two days: backups 5 and 7.
      expect(JSON.parse(r.stdout).kept).toEqual([ids[5], ids[7]]);
      expect(list(repo).map((x) => x.id)).toEqual([ids[5], ids[7]]);
      await expectSound(repo, copies);
    });

    it('--max-merges defers the rest to the next run', async () => {
      const repo = join(dir, `max-${layout}`);
      const copies = await makeChain(repo, layout, 5);
      const ids = [...copies.keys()];
      const first = JSON.parse(vhdvault('prune', repo, '--keep-last', '1', '--max-merges', '2', '--json').stdout);
      expect(first.merged).toBe(2);
      expect(first.removed).toEqual(ids.slice(0, 2));
      expect(list(repo)).toHaveLength(3);
      await expectSound(repo, copies);
      const second = JSON.parse(vhdvault('prune', repo, '--keep-last', '1', '--json').stdout);
      expect(second.merged).toBe(2);
      expect(list(repo).map((x) => x.id)).toEqual([ids[4]]);
      await expectSound(repo, copies);
    });

    it('a chain nothing kept depends on is deleted, not merged', async () => {
      const repo = join(dir, `dead-${layout}`);
      const copies = await makeChain(repo, layout, 2); // F1 ← D1
      const disk = `${repo}.raw`;
      for (let i = 0; i < 3; i++) {
        await scribble(disk, [i]);
        const r = vhdvault('backup', repo, 'vm', '--source', disk, ...(i === 0 ? ['--full'] : [])); // F2 ← D2 ← D3
        expect(r.code, r.stderr).toBe(0);
        const copy = `${repo}-${r.stdout.trim()}.raw`;
        await copyFile(disk, copy);
        copies.set(r.stdout.trim(), copy);
      }
      const ids = [...copies.keys()];
      const r = JSON.parse(vhdvault('prune', repo, '--keep-last', '3', '--max-merges', '0', '--json').stdout);
      expect(r).toMatchObject({ kept: ids.slice(2), removed: ids.slice(0, 2), merged: 0 });
      expect(list(repo).map((x) => x.id)).toEqual(ids.slice(2));
      await expectSound(repo, copies);
    });

    it('merging a partial block keeps the sectors it does not hold coming from further down the chain', async () => {
      const repo = join(dir, `partial-${layout}`);
      const copies = await makeChain(repo, layout, 1); // F: every block random
      const disk = `${repo}.raw`;
      const ids = [...copies.keys()];
      // D1 changes block 0 only; D2 changes the first half of block 3 only.
      for (const change of [{ block: 0, bytes: BLOCK }, { block: 3, bytes: BLOCK / 2 }]) {
        const fh = await open(disk, 'r+');
        await fh.write(randomBytes(change.bytes), 0, change.bytes, change.block * BLOCK);
        await fh.close();
        const r = vhdvault('backup', repo, 'vm', '--source', disk);
        expect(r.code, r.stderr).toBe(0);
        ids.push(r.stdout.trim());
        const copy = `${repo}-${r.stdout.trim()}.raw`;
        await copyFile(disk, copy);
        copies.set(r.stdout.trim(), copy);
      }
      const [full, d1, d2] = ids as [string, string, string];
      // Make D2's block 3 partial, as other writers store blocks: the unchanged second half
      // (sectors 2048–4095) marked absent, so it must come from F (D1 does not store block 3).
      const diskDir = join(repo, 'disks', 'vm');
      if (layout === 'dir') {
        const file = join(diskDir, `${d2}.vhd-dir`, 'blocks', '0', '3');
        const stored = await readFile(file);
        stored.fill(0, 256, 512);
        await writeFile(file, stored);
      } else {
        const fh = await open(join(diskDir, `${d2}.vhd`), 'r+');
        const entry = Buffer.alloc(4);
        await fh.read(entry, 0, 4, 1536 + 3 * 4);
        await fh.write(Buffer.alloc(256), 0, 256, entry.readUInt32BE(0) * 512 + 256);
        await fh.close();
      }
      const metaPath = join(diskDir, `${d2}.json`);
      const meta = JSON.parse(await readFile(metaPath, 'utf8'));
      await writeFile(metaPath, JSON.stringify({ ...meta, wholeBlocks: false }));
      // Only D1 goes: F is alone in an older year; keep-last keeps D2.
      const fullMeta = join(diskDir, `${full}.json`);
      await writeFile(fullMeta, JSON.stringify({ ...JSON.parse(await readFile(fullMeta, 'utf8')), createdAt: new Date(2020, 5, 1).toISOString() }));
      await expectSound(repo, copies); // sound before the merge
      const r = JSON.parse(vhdvault('prune', repo, '--keep-last', '1', '--keep-yearly', '2', '--json').stdout);
      expect(r).toMatchObject({ kept: [full, d2], removed: [d1], merged: 1 });
      await expectSound(repo, copies);
      expect(vhdvault('verify', repo).code).toBe(0);
    });

    if (layout === 'dir') {
      it("a merged delta's block files keep their inodes (renamed, not copied)", async () => {
        const repo = join(dir, 'inode');
        const copies = await makeChain(repo, 'dir', 2);
        const [, delta] = [...copies.keys()];
        const blockPath = join(repo, 'disks', 'vm', `${delta}.vhd-dir`, 'blocks', '0', '1'); // block 1 changed in backup 1
        const before = await stat(blockPath);
        expect(vhdvault('prune', repo, '--keep-last', '1').code).toBe(0);
        const after = await stat(blockPath);
        expect(after.ino).toBe(before.ino);
        await expectSound(repo, copies);
      });
    }
  });
}

describe('usage', () => {
  it('prune needs at least one --keep-* option', () => {
    const r = vhdvault('prune', join(dir, 'last-dir'));
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--keep/);
  });

  it('a --keep-* count must be a whole number of at least 1 (0 would keep nothing of it)', () => {
    for (const bad of ['0', '', '-1', '1.5', '0x2', '1e1']) {
      const r = vhdvault('prune', join(dir, 'last-dir'), '--keep-daily', bad, '--dry-run');
      expect(r.code, `--keep-daily ${JSON.stringify(bad)}: ${r.stderr}`).toBe(2);
    }
    expect(vhdvault('prune', join(dir, 'last-dir'), '--keep-last', '1', '--max-merges', '-1').code).toBe(2);
  });
});

const KILLS = 30;

for (const layout of ['dir', 'vhd'] as const) {
  describe(`prune killed with SIGKILL at ${KILLS} random moments (layout ${layout})`, () => {
    it('every kept backup restores exactly after the rerun, and no orphan files remain', async () => {
      const repo = join(dir, `kill-${layout}`);
      const copies = await makeChain(repo, layout, 3);
      const disk = `${repo}.raw`;
      const timed = (args: string[]) => {
        const start = performance.now();
        const r = vhdvault(...args);
        expect(r.code, r.stderr).toBe(0);
        return performance.now() - start;
      };
      const twoBackups = async () => {
        for (let i = 0; i < 2; i++) {
          await scribble(disk, [randomInt(8), randomInt(8), randomInt(8), randomInt(8)]);
          const r = vhdvault('backup', repo, 'vm', '--source', disk);
          expect(r.code, r.stderr).toBe(0);
          const copy = `${repo}-${r.stdout.trim()}.raw`;
          await copyFile(disk, copy);
          copies.set(r.stdout.trim(), copy);
        }
      };
      const journal = join(repo, 'disks', 'vm', 'merge.json');
      // One uninterrupted cycle measures the whole run and the merge window (while merge.json exists).
      await twoBackups();
      const runMs = timed(['prune', repo, '--keep-last', '3']);
      let interrupted = 0;
      for (let k = 0; k < KILLS; k++) {
        // Two new backups, then a prune that merges two: killed somewhere in it.
        await twoBackups();
        const child = spawn(process.execPath, [CLI, 'prune', repo, '--keep-last', '3'], { stdio: 'ignore' });
        let done = false;
        const exited = new Promise((resolve) => child.on('exit', resolve)).then(() => (done = true));
        if (k % 2 === 0) {
          // Anywhere in the run, start-up included.
          await Promise.race([sleep(randomInt(0, Math.ceil(runMs))), exited]);
        } else {
          // Aimed: start-up is most of a run, so wait for the journal, then kill within a few ms of it.
          while (!done && !existsSync(journal)) await sleep(1);
          await Promise.race([sleep(randomInt(0, 12)), exited]);
        }
        child.kill('SIGKILL');
        await exited;
        if (existsSync(journal)) interrupted++;
        // The next command finds any interrupted merge and finishes it; the rerun completes the policy.
        timed(['prune', repo, '--keep-last', '3']);
        expect(existsSync(journal)).toBe(false);
        expect(list(repo)).toHaveLength(3);
        if (k % 10 === 9 || k === KILLS - 1) await expectSound(repo, copies);
      }
      // The kills must really have landed inside merges, or this test proves nothing.
      expect(interrupted, `${interrupted} of ${KILLS} kills interrupted a merge`).toBeGreaterThanOrEqual(KILLS / 6);
      expect(vhdvault('verify', repo).code).toBe(0);
    });
  });
}
