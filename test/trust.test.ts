// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { cp as cpDir, mkdir, readFile, readdir, rename, rm, writeFile, open } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it, test } from 'vitest';
import { vhdvault } from './helpers/cli.js';
import { makeRaw, mountTmpfs, sha256, tempDir } from './helpers/files.js';
import { backupOf, initRepo, rewriteMetadata } from './helpers/store.js';
import { BLOCK, copyFixture, expectRestores, type Fixture, isCoordination, makeFixture, MiB, snapshot, vhdvaultAsync } from './helpers/repoFixture.js';

const dir = await tempDir();
const diskDir = (f: Fixture) => join(f.repo, 'disks', 'vm');
const meta = (f: Fixture, id: string) => join(diskDir(f), `${id}.json`);
let n = 0;
const fresh = (base: Fixture) => copyFixture(base, join(dir, `case-${n++}`));

for (const layout of ['dir', 'vhd'] as const) {
  describe.concurrent(`trust (layout ${layout})`, () => {
    // The two layouts side by side (their own repositories and files); each layout's tests in turn.
    const it = test.sequential;
    let base: Fixture; // F ← D1 ← D2 ← D3
    const ext = layout === 'dir' ? 'vhd-dir' : 'vhd';
    beforeAll(async () => {
      base = await makeFixture(join(dir, `base-${layout}`), layout, 4);
    });

    it('1: a backup whose metadata is lost is reported and never deleted; the next backup is full', async () => {
      const f = await fresh(base);
      const [, d1, d2] = f.ids as [string, string, string, string];
      await rename(meta(f, d1), join(dir, `saved-${layout}.json`));

      const list = vhdvault('list', f.repo);
      expect(list.code).toBe(0);
      expect(list.stderr).toContain(`${d1}.${ext} belongs to no listed backup`);
      expect(list.stderr).toContain(`backup ${d2}: its parent backup ${d1} is not in the repository`);
      const verify = vhdvault('verify', f.repo);
      expect(verify.code).toBe(1);
      expect(verify.stderr).toContain(`${d1}.${ext} belongs to no listed backup`);

      const before = await snapshot(f.repo, isCoordination);
      const backup = vhdvault('backup', f.repo, 'vm', '--source', `${base.repo}.raw`);
      expect(backup.code, backup.stderr).toBe(0);
      expect(backup.stderr).toMatch(/taking a full backup/);
      const after = await snapshot(f.repo, isCoordination);
      for (const file of Object.keys(before)) expect(after[file], `${file} after backup`).toBe(before[file]);

      // Prune refuses to touch the broken chain, and changes nothing.
      const prune = vhdvault('prune', f.repo, '--keep-last', '1');
      expect(prune.code).toBe(1);
      expect(prune.stderr).toMatch(/prune refused, nothing changed/);
      expect(await snapshot(f.repo, isCoordination)).toEqual(after);

      // Putting the metadata back makes every backup whole again: nothing was lost.
      await rename(join(dir, `saved-${layout}.json`), meta(f, d1));
      expect(vhdvault('verify', f.repo).code).toBe(0);
      for (const id of f.ids) await expectRestores(f, id, dir);
    });

    it('2: prune refuses a chain whose metadata names the wrong parent, changing nothing', async () => {
      const f = await fresh(base);
      const [full, d1, d2] = f.ids as [string, string, string, string];
      const original = await readFile(meta(f, d2), 'utf8');
      // Named wrongly but consistently (sealed): the lineage check, not the seal, must catch it.
      await rewriteMetadata(meta(f, d2), (m) => ({ ...m, parent: full }));
      expect(vhdvault('verify', f.repo).code).toBe(1);
      const before = await snapshot(f.repo, isCoordination);
      const prune = vhdvault('prune', f.repo, '--keep-last', '1');
      expect(prune.code).toBe(1);
      expect(prune.stderr).toContain(`backup ${d2}`);
      expect(prune.stderr).toMatch(/UUID/);
      const dry = vhdvault('prune', f.repo, '--keep-last', '1', '--dry-run', '--json');
      expect(dry.code).toBe(1);
      expect(await snapshot(f.repo, isCoordination)).toEqual(before);
      await writeFile(meta(f, d2), original);
      expect(vhdvault('verify', f.repo).code).toBe(0);
      for (const id of [full, d1, d2]) await expectRestores(f, id, dir);
    });

    it('4: a moved repository restores; a copy missing a parent fails clearly instead of reading the original', async () => {
      const moved = await fresh(base);
      const elsewhere = join(dir, `moved-${layout}`);
      await rename(moved.repo, elsewhere);
      const m = { ...moved, repo: elsewhere };
      expect(vhdvault('verify', m.repo).code).toBe(0);
      await expectRestores(m, m.ids[3]!, dir);

      // The copy lacks D1's data; the original (at its absolute path) still has it.
      const copy = await fresh(base);
      const d1 = copy.ids[1]!;
      await rm(join(diskDir(copy), `${d1}.${ext}`), { recursive: true });
      const r = vhdvault('restore', copy.repo, 'vm', join(dir, 'nope.raw'), '--backup', copy.ids[3]!);
      expect(r.code).toBe(1);
      expect(r.stderr).toContain(`${d1}.${ext}`);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(vhdvault('verify', copy.repo).code).toBe(1);
    });

    it('5: restores, verifies and vhd checks running beside prunes always succeed and are exact', async () => {
      for (let round = 0; round < 2; round++) {
        const f = await fresh(base);
        const latest = f.ids.at(-1)!;
        const out = join(dir, `during-prune-${layout}-${round}.raw`);
        const readers = (async () => {
          const results = [];
          for (let i = 0; i < 3; i++) {
            results.push(await vhdvaultAsync('restore', f.repo, 'vm', `${out}.${i}`));
            results.push(await vhdvaultAsync('verify', f.repo));
            // A vhd tool pointed into the repository is a reader of that disk too.
            results.push(await vhdvaultAsync('vhd', 'check', join(diskDir(f), `${latest}.${ext}`)));
          }
          return results;
        })();
        const prune = vhdvaultAsync('prune', f.repo, '--keep-last', String(1 + (round % 2)));
        const [results, pr] = await Promise.all([readers, prune]);
        expect(pr.code, pr.stderr).toBe(0);
        for (const r of results) expect(r.code, r.stderr).toBe(0);
        for (let i = 0; i < 3; i++) expect(await sha256(`${out}.${i}`)).toBe(f.content.get(latest));
      }
    });

    it('a damaged merge journal stops every command with a line saying what it is, and nothing is deleted', async () => {
      const f = await fresh(base);
      await writeFile(join(diskDir(f), 'merge.json'), '{"format":1,"step":');
      const before = await snapshot(f.repo, isCoordination);
      for (const args of [
        ['list', f.repo],
        ['verify', f.repo],
        ['restore', f.repo, 'vm', join(dir, 'j.raw')],
        ['backup', f.repo, 'vm', '--source', `${base.repo}.raw`],
        ['prune', f.repo, '--keep-last', '1'],
      ]) {
        const r = vhdvault(...args);
        expect(r.code, args[0]).toBe(1);
        expect(r.stderr).toMatch(/merge\.json: the journal of an interrupted retention merge is damaged/);
        expect(r.stderr.trim().split('\n')).toHaveLength(1);
      }
      expect(await snapshot(f.repo, isCoordination)).toEqual(before);
    });

    it('a missing digests file is named; restore of that backup says so; the next backup is full', async () => {
      const f = await fresh(base);
      const last = f.ids.at(-1)!;
      await rm(join(diskDir(f), `${last}.digests`));
      const v = vhdvault('verify', f.repo);
      expect(v.code).toBe(1);
      expect(v.stderr).toContain(`${last}.digests is missing`);
      const r = vhdvault('restore', f.repo, 'vm', join(dir, 'x.raw'), '--backup', last);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(/digests file is missing/);
      expect(r.stderr).not.toMatch(/ENOENT/);
      const b = vhdvault('backup', f.repo, 'vm', '--source', `${base.repo}.raw`, '--json');
      expect(b.code, b.stderr).toBe(0);
      expect(JSON.parse(b.stdout).kind).toBe('full');
      await expectRestores(f, f.ids[2]!, dir);
    });
  });
}

describe('what a review found', () => {
  it('a backup with two children (a fork) is never deleted or merged into one of them', async () => {
    for (const keep of ['1', '2']) {
      const repo = join(dir, `fork-${keep}`);
      const disk = `${repo}.raw`;
      // Set-up in this process (`vhdvault init`, `vhdvault backup`): prune, verify and list run the CLI.
      await initRepo(repo, 'dir');
      await makeRaw(disk, 8 * MiB, [[0, 8 * MiB]]);
      const content = new Map<string, string>();
      const take = async () => {
        const id = await backupOf(repo, 'vm', disk);
        content.set(id, await sha256(disk));
        return id;
      };
      const scribble = async (block: number) => {
        const fh = await open(disk, 'r+');
        await fh.write(randomBytes(4096), 0, 4096, block * BLOCK);
        await fh.close();
      };
      const a = await take();
      await scribble(1);
      const b = await take();
      await scribble(3);
      // With B's metadata lost, C is a delta of A; then B's metadata is put back: A has two children.
      const bMeta = join(repo, 'disks', 'vm', `${b}.json`);
      await rename(bMeta, `${bMeta}.saved`);
      const c = await take();
      await rename(`${bMeta}.saved`, bMeta);
      const rows = (JSON.parse(vhdvault('list', repo, '--json').stdout) as { backups: Array<{ id: string; parent: string | null }> }).backups;
      expect(rows.find((r) => r.id === c)?.parent).toBe(a);
      const prune = vhdvault('prune', repo, '--keep-last', keep);
      expect(prune.code, prune.stderr).toBe(0);
      expect(vhdvault('verify', repo).code).toBe(0);
      const left = (JSON.parse(vhdvault('list', repo, '--json').stdout) as { backups: Array<{ id: string }> }).backups.map((r) => r.id);
      expect(left).toContain(c);
      if (keep === '2') expect(prune.stderr).toMatch(/kept although the policy removes it/);
      for (const id of left) await expectRestores({ repo, ids: left, content }, id, dir);
    }
  });

  it('a stale or forged merge journal that does not match the disk is refused, changing nothing', async () => {
    const f = await makeFixture(join(dir, 'forged'), 'dir', 3);
    const d = join(f.repo, 'disks', 'vm');
    const [a, b] = f.ids as [string, string, string];
    const journal = { format: 1, parent: JSON.parse(await readFile(join(d, `${a}.json`), 'utf8')), child: JSON.parse(await readFile(join(d, `${b}.json`), 'utf8')), footer: 'AAAA', step: 'swap' };
    await writeFile(join(d, 'merge.json'), JSON.stringify(journal));
    const before = await snapshot(f.repo, isCoordination);
    const list = vhdvault('list', f.repo);
    expect(list.code).toBe(1);
    expect(list.stderr).toMatch(/does not match the disk/);
    expect(await snapshot(f.repo, isCoordination)).toEqual(before);
  });

  it('a deletion a killed prune began is finished by the next writer, and never reported as orphaned data', async () => {
    const f = await makeFixture(join(dir, 'deleting'), 'vhd', 2);
    const d = join(f.repo, 'disks', 'vm');
    const [old, kept] = f.ids as [string, string];
    // Make the old backup a dead chain (the newer one a full), then stop its deletion after the intent.
    const full = vhdvault('backup', f.repo, 'vm', '--source', `${f.repo}.raw`, '--full');
    expect(full.code).toBe(0);
    await rename(join(d, `${kept}.json`), join(d, `.${kept}.deleting.tmp`));
    await rm(join(d, `${kept}.digests`));
    const list = vhdvault('list', f.repo);
    expect(list.code).toBe(0);
    expect(list.stderr).toBe('');
    expect(vhdvault('backup', f.repo, 'vm', '--source', `${f.repo}.raw`).code).toBe(0);
    expect((await readdir(d)).filter((n) => n.startsWith(kept) || n.includes(`.${kept}.`))).toEqual([]);
    expect(vhdvault('verify', f.repo).code).toBe(0);
    await expectRestores(f, old, dir);
  });

  it("a merge's set-aside blocks outlive a journal removed by hand, until the merge visibly committed", async () => {
    const f = await makeFixture(join(dir, 'set-aside'), 'dir', 2);
    const d = join(f.repo, 'disks', 'vm');
    const [p] = f.ids as [string, string];
    // What a merge of P interrupted in its blocks step leaves, its journal then moved away by hand.
    await mkdir(join(d, `.${p}.replaced.tmp`));
    await writeFile(join(d, `.${p}.replaced.tmp`, '0'), randomBytes(4096));
    expect(vhdvault('backup', f.repo, 'vm', '--source', `${f.repo}.raw`).code).toBe(0);
    expect(await readdir(d)).toContain(`.${p}.replaced.tmp`);
    // Once P is gone (the merge's commit), the set-aside blocks are garbage.
    expect(vhdvault('prune', f.repo, '--keep-last', '1').code).toBe(0);
    expect(vhdvault('backup', f.repo, 'vm', '--source', `${f.repo}.raw`).code).toBe(0);
    expect((await readdir(d)).filter((n) => n.includes('.replaced.'))).toEqual([]);
  });

  it('prune over every disk prunes the sound ones, refuses the broken one, and fails at the end', async () => {
    const f = await makeFixture(join(dir, 'two-disks'), 'dir', 3);
    const d = join(f.repo, 'disks');
    await cpDir(join(d, 'vm'), join(d, 'avm'), { recursive: true });
    for (const name of await readdir(join(d, 'avm'))) {
      if (!name.endsWith('.json')) continue;
      const m = JSON.parse(await readFile(join(d, 'avm', name), 'utf8'));
      await writeFile(join(d, 'avm', name), JSON.stringify({ ...m, disk: 'avm' }));
    }
    await rm(join(d, 'avm', `${f.ids[1]}.digests`));
    const r = vhdvault('prune', f.repo, '--keep-last', '1', '--json');
    expect(r.code).toBe(1);
    const report = JSON.parse(r.stdout);
    expect(report.refused.map((x: { disk: string }) => x.disk)).toEqual(['avm']);
    expect(report.merged).toBe(2);
    expect((await readdir(join(d, 'avm'))).filter((n) => n.endsWith('.json'))).toHaveLength(3);
  });

  it('a block file missing from the latest chain makes the next backup full, with a note', async () => {
    const f = await makeFixture(join(dir, 'missing-block'), 'dir', 3);
    await rm(join(f.repo, 'disks', 'vm', `${f.ids[1]}.vhd-dir`, 'blocks', '0', '0'));
    const r = vhdvault('backup', f.repo, 'vm', '--source', `${f.repo}.raw`, '--json');
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ kind: 'full' });
    expect(JSON.parse(r.stdout).note).toMatch(/blocks\/0\/0.*missing/);
  });
});

describe('crash between commit steps', () => {
  it('data renamed into place without its metadata yet is finished by the next run, not reported or removed', async () => {
    const f = await makeFixture(join(dir, 'commit'), 'dir', 2);
    const d = join(f.repo, 'disks', 'vm');
    const last = f.ids[1]!;
    // The state a kill between the data's rename and the metadata's leaves: pending metadata, data in place.
    await rename(join(d, `${last}.json`), join(d, `.${last}.json.tmp`));
    await rename(join(d, `${last}.digests`), join(d, `.${last}.digests.tmp`));
    const b = vhdvault('backup', f.repo, 'vm', '--source', `${f.repo}.raw`);
    expect(b.code, b.stderr).toBe(0);
    expect(b.stderr).toBe('');
    const rows = (JSON.parse(vhdvault('list', f.repo, '--json').stdout) as { backups: Array<{ id: string; parent: string | null }> }).backups;
    expect(rows.map((r) => r.id).slice(0, 2)).toEqual(f.ids);
    expect(rows[2]!.parent).toBe(last);
    expect(vhdvault('verify', f.repo).code).toBe(0);
    expect((await readdir(d)).filter((x) => x.endsWith('.tmp'))).toEqual([]);
  });
});

describe('a full filesystem', () => {
  it('a backup that runs out of space names the folder and changes nothing; prune still frees space', async (ctx) => {
    const mnt = join(dir, 'small');
    await mkdir(mnt);
    if (!mountTmpfs(mnt, '36m')) {
      if (process.env.CI) throw new Error('CI runs as root and must be able to mount a tmpfs for this test');
      ctx.skip();
    }
    try {
      const repo = join(mnt, 'repo');
      const disk = join(dir, 'full-disk.raw');
      const size = 16 * MiB;
      await makeRaw(disk, size, [[0, size]]);
      expect(vhdvault('init', repo).code).toBe(0);
      const content = new Map<string, string>();
      const take = (...extra: string[]) => vhdvault('backup', repo, 'vm', '--source', disk, ...extra);
      const first = take();
      expect(first.code, first.stderr).toBe(0);
      content.set(first.stdout.trim(), await sha256(disk));
      const fh = await open(disk, 'r+');
      await fh.write(randomBytes(BLOCK), 0, BLOCK, 0);
      await fh.close();
      const second = take();
      expect(second.code, second.stderr).toBe(0);
      content.set(second.stdout.trim(), await sha256(disk));

      // 16 + 2 MiB stored and a 4 MiB reserve: another full 16 MiB does not fit in 36 MiB.
      const before = await snapshot(repo, isCoordination);
      const third = take('--full');
      expect(third.code).toBe(1);
      expect(third.stderr).toMatch(new RegExp(`${join(repo, 'disks', 'vm')}: no space left on device`));
      expect(third.stderr.trim().split('\n')).toHaveLength(1);
      expect(await snapshot(repo, isCoordination)).toEqual(before);
      expect(vhdvault('verify', repo).code).toBe(0);

      // Fill every last byte, then prune: it must still run and free space.
      const filler = await open(join(mnt, 'filler'), 'w');
      const chunk = Buffer.alloc(MiB, 1);
      try {
        for (;;) await filler.write(chunk);
      } catch (err) {
        expect((err as NodeJS.ErrnoException).code).toBe('ENOSPC');
      }
      try {
        for (;;) await filler.write(chunk, 0, 4096);
      } catch {
        // full to the page
      }
      await filler.close();
      const prune = vhdvault('prune', repo, '--keep-last', '1');
      expect(prune.code, prune.stderr).toBe(0);
      const latest = second.stdout.trim();
      const rows = (JSON.parse(vhdvault('list', repo, '--json').stdout) as { backups: Array<{ id: string }> }).backups;
      expect(rows.map((r) => r.id)).toEqual([latest]);
      expect(vhdvault('verify', repo).code).toBe(0);
      const out = join(dir, 'after-full.raw');
      expect(vhdvault('restore', repo, 'vm', out).code).toBe(0);
      expect(await sha256(out)).toBe(content.get(latest));
    } finally {
      execFileSync('umount', ['-l', mnt]);
    }
  });
});
