// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
import { open, readFile, stat, writeFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { vhdvault, vhdvaultAsync } from './helpers/cli.js';
import { tempDir } from './helpers/files.js';
import { backupAndCopy, BLOCK, expectSound, list, makeChain, scribble } from './helpers/pruneChain.js';
import { selectRetention } from '../src/store/retention.js';
import { rewriteMetadata } from './helpers/store.js';

// Chains are built in this process (helpers/pruneChain.ts); prune, verify and the
// restores that check the result run the built CLI. prune killed at random moments
// is pruneKillRandom.test.ts (split off so that the two files can run side by side).
const dir = await tempDir();

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
      expect((await list(repo)).map((r) => r.id)).toEqual(ids); // dry run changed nothing
      const r = vhdvault('prune', repo, '--keep-last', '3', '--json');
      expect(r.code, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout)).toMatchObject({ kept: ids.slice(5), removed: ids.slice(0, 5), merged: 5 });
      const rows = await list(repo);
      expect(rows.map((x) => x.id)).toEqual(ids.slice(5));
      await expectSound(repo, layout, copies, rows);
      expect(vhdvault('verify', repo).code).toBe(0);
    });

    it('keep-daily over backups spread across days', async () => {
      const repo = join(dir, `daily-${layout}`);
      const copies = await makeChain(repo, layout, 8);
      const ids = [...copies.keys()];
      // Spread the 8 backups over 4 days, two a day (ids stay in time order).
      for (const [i, id] of ids.entries()) {
        const path = join(repo, 'disks', 'vm', `${id}.json`);
        await rewriteMetadata(path, (meta) => ({ ...meta, createdAt: new Date(2026, 0, 10 + Math.floor(i / 2), 8 + (i % 2) * 8).toISOString() }));
      }
      const r = vhdvault('prune', repo, '--keep-daily', '2', '--json');
      expect(r.code, r.stderr).toBe(0);
      // The newest of each of the last two days: backups 5 and 7.
      expect(JSON.parse(r.stdout).kept).toEqual([ids[5], ids[7]]);
      const rows = await list(repo);
      expect(rows.map((x) => x.id)).toEqual([ids[5], ids[7]]);
      await expectSound(repo, layout, copies, rows);
    });

    it('--max-merges defers the rest to the next run', async () => {
      const repo = join(dir, `max-${layout}`);
      const copies = await makeChain(repo, layout, 5);
      const ids = [...copies.keys()];
      const first = JSON.parse(vhdvault('prune', repo, '--keep-last', '1', '--max-merges', '2', '--json').stdout);
      expect(first.merged).toBe(2);
      expect(first.removed).toEqual(ids.slice(0, 2));
      const rows = await list(repo);
      expect(rows).toHaveLength(3);
      await expectSound(repo, layout, copies, rows);
      const second = JSON.parse(vhdvault('prune', repo, '--keep-last', '1', '--json').stdout);
      expect(second.merged).toBe(2);
      const after = await list(repo);
      expect(after.map((x) => x.id)).toEqual([ids[4]]);
      await expectSound(repo, layout, copies, after);
    });

    it('a chain nothing kept depends on is deleted, not merged', async () => {
      const repo = join(dir, `dead-${layout}`);
      const copies = await makeChain(repo, layout, 2); // F1 ← D1
      const disk = `${repo}.raw`;
      for (let i = 0; i < 3; i++) {
        await scribble(disk, [i]);
        await backupAndCopy(repo, disk, copies, i === 0); // F2 ← D2 ← D3
      }
      const ids = [...copies.keys()];
      // --max-merges 0 would silently keep what the policy removes: a usage error.
      expect(vhdvault('prune', repo, '--keep-last', '3', '--max-merges', '0').code).toBe(2);
      const r = JSON.parse(vhdvault('prune', repo, '--keep-last', '3', '--max-merges', '1', '--json').stdout);
      expect(r).toMatchObject({ kept: ids.slice(2), removed: ids.slice(0, 2), merged: 0 });
      const rows = await list(repo);
      expect(rows.map((x) => x.id)).toEqual(ids.slice(2));
      await expectSound(repo, layout, copies, rows);
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
        ids.push(await backupAndCopy(repo, disk, copies));
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
      await rewriteMetadata(metaPath, (meta) => ({ ...meta, wholeBlocks: false }));
      // Only D1 goes: F is alone in an older year; keep-last keeps D2.
      const fullMeta = join(diskDir, `${full}.json`);
      await rewriteMetadata(fullMeta, (meta) => ({ ...meta, createdAt: new Date(2020, 5, 1).toISOString() }));
      await expectSound(repo, layout, copies); // sound before the merge
      const r = JSON.parse(vhdvault('prune', repo, '--keep-last', '1', '--keep-yearly', '2', '--json').stdout);
      expect(r).toMatchObject({ kept: [full, d2], removed: [d1], merged: 1 });
      await expectSound(repo, layout, copies);
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
        await expectSound(repo, layout, copies);
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

  it('a --keep-* count must be a whole number of at least 1 (0 would keep nothing of it)', async () => {
    // Refused before anything is read: the runs go side by side.
    const bads = ['0', '', '-1', '1.5', '0x2', '1e1'];
    const [maxMerges, ...results] = await Promise.all([
      vhdvaultAsync('prune', join(dir, 'last-dir'), '--keep-last', '1', '--max-merges', '-1'),
      ...bads.map((bad) => vhdvaultAsync('prune', join(dir, 'last-dir'), '--keep-daily', bad, '--dry-run')),
    ]);
    for (const [i, bad] of bads.entries()) {
      const r = results[i]!;
      expect(r.code, `--keep-daily ${JSON.stringify(bad)}: ${r.stderr}`).toBe(2);
    }
    expect(maxMerges!.code).toBe(2);
  });
});
