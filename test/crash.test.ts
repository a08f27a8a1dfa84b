// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
import { spawn } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { copyFile, open, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { CLI, cliEnv, vhdvaultAsync } from './helpers/cli.js';
import { makeRaw, sameBytes, tempDir } from './helpers/files.js';
import { backupOf, expectEncrypted, initRepo, listed, useTestPassword } from './helpers/store.js';
import type { Cipher } from '../src/crypto/aead.js';
import { Repository } from '../src/store/repository.js';
import { restore } from '../src/store/restore.js';

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;
const SIZE = 24 * MiB;
const KILLS = 12;
const dir = await tempDir();
// The encrypted repositories' password, for this process and every CLI it starts.
useTestPassword();

/** The ids `vhdvault list <repo> vm` lists (the same listing, read in this process: no CLI start-up per look). */
async function listIds(repo: string): Promise<string[]> {
  return (await listed(repo, 'vm')).map((row) => row.id);
}

/** Run a backup and SIGKILL it after `afterMs` (it may also finish first). */
async function killedBackup(repo: string, source: string, afterMs: number): Promise<void> {
  // Rate-limited so that a run lasts about a second and kills land in every stage.
  const child = spawn(process.execPath, [CLI, 'backup', repo, 'vm', '--source', source, '--max-read', '24M', '--concurrency', '2'], { stdio: 'ignore', env: cliEnv() });
  const exited = new Promise((resolve) => child.on('exit', resolve));
  await Promise.race([sleep(afterMs), exited]);
  child.kill('SIGKILL');
  await exited;
}

async function scribble(raw: string): Promise<void> {
  const fh = await open(raw, 'r+');
  for (let i = 0; i < 3; i++) await fh.write(randomBytes(64 * 1024), 0, 64 * 1024, randomInt(SIZE / BLOCK) * BLOCK);
  await fh.close();
}

interface Case {
  layout: 'dir' | 'vhd' | 'objects';
  encryption?: Cipher;
  kills: number;
}

// The layouts that can be encrypted (dir and objects), encrypted, with fewer kills each than the unencrypted ones.
const CASES: Case[] = [
  { layout: 'dir', kills: KILLS },
  { layout: 'vhd', kills: KILLS },
  { layout: 'dir', encryption: 'aes-256-gcm', kills: 4 },
  { layout: 'objects', encryption: 'chacha20-poly1305', kills: 4 },
];

// The cases run side by side: a killed backup spends most of its second waiting on --max-read.
for (const { layout, encryption, kills } of CASES) {
  const tag = `${layout}${encryption ? '-encrypted' : ''}`;
  describe.concurrent(`backup killed with SIGKILL at ${kills} random moments (layout ${layout}${encryption ? `, encrypted with ${encryption}` : ''})`, () => {
    it('never lists a partial backup, recovers on the next run, and keeps every earlier backup exact', async () => {
      const repo = join(dir, `repo-${tag}`);
      const disk = join(dir, `disk-${tag}.raw`);
      // Set-up in this process: `vhdvault init` and the first, uninterrupted backup.
      await initRepo(repo, layout, layout === 'dir' ? 'gzip' : 'none', encryption);
      await makeRaw(disk, SIZE, [[0, SIZE]]);
      /** The disk's content for each committed backup. */
      const expected = new Map<string, string>();
      const commit = async (ids: string[]) => {
        for (const id of ids) {
          if (expected.has(id)) continue;
          const copy = join(dir, `${tag}-${id}.raw`);
          await copyFile(disk, copy);
          expected.set(id, copy);
        }
      };

      await backupOf(repo, 'vm', disk);
      await commit(await listIds(repo));
      if (encryption) await expectEncrypted(repo);

      for (let k = 0; k < kills; k++) {
        await scribble(disk);
        const before = await listIds(repo);
        await killedBackup(repo, disk, randomInt(30, 1400));
        const after = await listIds(repo);
        // Earlier backups are all still listed; at most the one attempted appears, and only complete.
        expect(after.slice(0, before.length)).toEqual(before);
        expect(after.length - before.length).toBeLessThanOrEqual(1);
        await commit(after);
        // Every few kills, a run that completes: it must succeed despite the leftovers.
        if (k % 4 === 3) {
          const r = await vhdvaultAsync('backup', repo, 'vm', '--source', disk);
          expect(r.stderr).toBe('');
          expect(r.code).toBe(0);
          await commit(await listIds(repo));
        }
      }

      const final = await vhdvaultAsync('backup', repo, 'vm', '--source', disk);
      expect(final.code, final.stderr).toBe(0);
      const ids = await listIds(repo);
      await commit(ids);
      // The first backup, one completed run after every fourth kill, and the final one (killed runs may add more).
      expect(ids.length).toBeGreaterThanOrEqual(Math.floor(kills / 4) + 2);

      // Nothing but committed backups remains: no temporary files, no orphans, no lock. The objects layout
      // keeps its block objects in blocks/ (verify reads every one a backup names), and a killed backup's
      // sweep marker (.<id>.sweep.tmp) on purpose until a prune collects what it uploaded (checked below).
      const files = (await readdir(join(repo, 'disks', 'vm'))).filter((f) => layout !== 'objects' || !(f === 'blocks' || /^\..+\.sweep\.tmp$/.test(f)));
      const committed = new Set(ids);
      for (const f of files) {
        const stem = f.replace(/\.(json|digests|vhd-dir|vhd)$/, '');
        expect(committed.has(stem), `leftover ${f}`).toBe(true);
      }
      expect(files).toHaveLength(ids.length * (layout === 'objects' ? 2 : 3));

      expect((await vhdvaultAsync('verify', repo)).code).toBe(0);
      // The restores only read the repository: two at a time, in this process (checks: the code
      // `vhdvault restore` runs, without a Node start-up).
      const restoreOne = async (id: string) => {
        const out = join(dir, `${tag}-restored-${id}.raw`);
        await restore(await Repository.open(repo), 'vm', out, { backup: id, format: 'raw' });
        expect(await sameBytes(out, expected.get(id)!), `backup ${id}`).toBe(true);
        await rm(out);
      };
      for (let i = 0; i < ids.length; i += 2) await Promise.all(ids.slice(i, i + 2).map(restoreOne));
      if (layout === 'objects') {
        // A prune collects what the killed backups uploaded and removes their sweep markers; what it keeps restores.
        const prune = await vhdvaultAsync('prune', repo, '--keep-last', '2');
        expect(prune.code, prune.stderr).toBe(0);
        expect((await readdir(join(repo, 'disks', 'vm'))).sort()).toEqual(['blocks', ...ids.slice(-2).flatMap((id) => [`${id}.digests`, `${id}.json`])].sort());
        await restoreOne(ids.at(-1)!);
      }
    });
  });
}
