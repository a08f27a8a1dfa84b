// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
/**
 * Prune killed (SIGKILL) right before its filesystem changes, chosen by count
 * rather than by time, so every step of a merge is a kill point: after every kill the repository must verify, every
 * listed backup must be one the user had (no partial one), the rerun must reach
 * the policy's result with nothing left over, and, sampled, every kept backup
 * restores exactly. The prune that is killed runs the built CLI; the checks and
 * the rerun run in this process.
 */
import { spawn } from 'node:child_process';
import { randomBytes, randomInt } from 'node:crypto';
import { cp, open, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { CLI, cliEnv } from './helpers/cli.js';
import { makeRaw, sha256, tempDir } from './helpers/files.js';
import { type ChainLayout, expectOnly } from './helpers/pruneChain.js';
import { backupOf, expectEncrypted, initRepo, listed as listing, useTestPassword } from './helpers/store.js';
import type { Cipher } from '../src/crypto/aead.js';
import { prune as pruneInProcess } from '../src/store/prune.js';
import { Repository } from '../src/store/repository.js';
import { restore } from '../src/store/restore.js';
import { verify } from '../src/store/verify.js';

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;
const SIZE = 8 * MiB;
const PRELOAD = fileURLToPath(new URL('./helpers/killAtFsOp.cjs', import.meta.url));
const POLICY = ['--keep-last', '2'];
const POINTS = 24;
/** Kill points checked at once (each on its own copy of the repository). */
const SIDE_BY_SIDE = 2;
const dir = await tempDir();
// The encrypted repositories' password, for this process and every CLI it starts.
useTestPassword();

function prune(repo: string, env: Record<string, string>): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['-r', PRELOAD, CLI, 'prune', repo, ...POLICY], { env: cliEnv(env), stdio: 'ignore' });
    child.on('error', reject);
    child.on('exit', (code) => resolve(code ?? -1));
  });
}

/** The ids `vhdvault list <repo> vm` lists (the same listing, read in this process). */
async function ids(repo: string): Promise<string[]> {
  return (await listing(repo, 'vm')).map((x) => x.id);
}

const CASES: Array<{ layout: ChainLayout; encryption?: Cipher; sample: number }> = [
  { layout: 'dir', sample: POINTS },
  { layout: 'vhd', sample: POINTS },
  // The layouts that can be encrypted (dir and objects, here on a folder), encrypted: fewer kill points each.
  { layout: 'dir', encryption: 'aes-256-gcm', sample: 8 },
  { layout: 'objects', encryption: 'chacha20-poly1305', sample: 8 },
];

// The cases run side by side: the kill points are counted, not timed, so load cannot move them.
for (const { layout, encryption, sample } of CASES) {
  const tag = `${layout}${encryption ? '-encrypted' : ''}`;
  describe.concurrent(`prune killed before each of its filesystem changes (layout ${layout}${encryption ? `, encrypted with ${encryption}` : ''})`, () => {
    it('leaves a repository that verifies, lists only whole backups, and finishes on the rerun', async () => {
      // Four backups of a changing disk (taken in this process: set-up); keep-last 2 merges two of them forward.
      const pristine = join(dir, `pristine-${tag}`);
      await initRepo(pristine, layout, 'none', encryption);
      const disk = join(dir, `disk-${tag}.raw`);
      await makeRaw(disk, SIZE, [[0, SIZE]]);
      const content = new Map<string, string>();
      for (let i = 0; i < 4; i++) {
        if (i > 0) {
          const fh = await open(disk, 'r+');
          await fh.write(randomBytes(BLOCK), 0, BLOCK, (i % 4) * BLOCK);
          await fh.close();
        }
        content.set(await backupOf(pristine, 'vm', disk), await sha256(disk));
      }
      if (encryption) await expectEncrypted(pristine);
      const all = [...content.keys()];
      const kept = all.slice(2);

      // How many changes an uninterrupted prune makes.
      const counted = join(dir, `counted-${tag}`);
      await cp(pristine, counted, { recursive: true });
      const countFile = join(dir, `count-${tag}`);
      expect(await prune(counted, { VHDVAULT_COUNT_OPS: countFile })).toBe(0);
      const changes = Number(await readFile(countFile, 'utf8'));
      expect(changes).toBeGreaterThan(20); // the preload really sees the merge's steps
      expect(await ids(counted)).toEqual(kept);

      // Every change is a kill point across runs: each run takes an evenly spread sample of
      // `sample` of them from a random offset (all of them would take minutes per layout).
      const step = Math.max(1, Math.ceil(changes / sample));
      const points: number[] = [];
      for (let k = 1 + randomInt(step); k <= changes; k += step) points.push(k);
      if (points.at(-1) !== changes) points.push(changes);
      const killAt = async (n: number, k: number) => {
        const work = join(dir, `work-${tag}-${k}`);
        await cp(pristine, work, { recursive: true });
        expect(await prune(work, { VHDVAULT_KILL_AT: String(k) }), `kill at change ${k}`).not.toBe(0);
        // Right after the crash (verify first finishes any merge the kill interrupted). The checks and the
        // rerun run in this process through the store's API (the code the CLI runs, without a Node start-up).
        const v = await verify(await Repository.open(work));
        expect(v.problems, `after kill at change ${k}`).toEqual([]);
        const listed = await ids(work);
        expect(listed.every((id) => content.has(id)), `kill at change ${k}`).toBe(true);
        expect(listed.slice(-2)).toEqual(kept);
        // The rerun completes the policy and leaves nothing but the kept backups.
        expect((await pruneInProcess(await Repository.open(work), undefined, { policy: { last: 2 } })).refused).toEqual([]);
        expect(await ids(work)).toEqual(kept);
        await expectOnly(work, layout, kept, `kill at change ${k}`);
        if (n % 6 === 0 || k === changes) {
          await Promise.all(
            kept.map(async (id) => {
              const out = join(dir, `restored-${tag}-${k}-${id}.raw`);
              await restore(await Repository.open(work), 'vm', out, { backup: id, format: 'raw' });
              expect(await sha256(out), `backup ${id} after kill at change ${k}`).toBe(content.get(id));
              await rm(out);
            }),
          );
        }
        await rm(work, { recursive: true, force: true });
      };
      for (let i = 0; i < points.length; i += SIDE_BY_SIDE) {
        await Promise.all(points.slice(i, i + SIDE_BY_SIDE).map((k, j) => killAt(i + j, k)));
      }
    });
  });
}
