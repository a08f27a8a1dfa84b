// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
/**
 * prune killed (SIGKILL) at random moments, then rerun: split off prune.test.ts
 * (whose chains and checks it shares, helpers/pruneChain.ts) so that the two files
 * can run on the two workers. Backups are taken in this process (set-up), and so
 * are the reruns after each kill and the restores that check the result; the
 * prune that is killed runs the built CLI.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { randomInt } from 'node:crypto';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { CLI, cliEnv, vhdvault } from './helpers/cli.js';
import { tempDir } from './helpers/files.js';
import { backupAndCopy, type ChainLayout, expectSound, list, makeChain, scribble } from './helpers/pruneChain.js';
import { expectEncrypted, useTestPassword } from './helpers/store.js';
import type { Cipher } from '../src/crypto/aead.js';
import { prune } from '../src/store/prune.js';
import { Repository } from '../src/store/repository.js';

const dir = await tempDir();
// The encrypted repositories' password, for this process and every CLI it starts.
useTestPassword();

const CASES: Array<{ layout: ChainLayout; encryption?: Cipher; kills: number }> = [
  { layout: 'dir', kills: 12 },
  { layout: 'vhd', kills: 12 },
  // The layouts that can be encrypted (dir and objects, here on a folder), encrypted: fewer kills each.
  { layout: 'dir', encryption: 'aes-256-gcm', kills: 4 },
  { layout: 'objects', encryption: 'chacha20-poly1305', kills: 6 },
];

for (const { layout, encryption, kills } of CASES) {
  const tag = `${layout}${encryption ? '-encrypted' : ''}`;
  describe(`prune killed with SIGKILL at ${kills} random moments (layout ${layout}${encryption ? `, encrypted with ${encryption}` : ''})`, () => {
    it('every kept backup restores exactly after the rerun, and no orphan files remain', async () => {
      const repo = join(dir, `kill-${tag}`);
      const copies = await makeChain(repo, layout, 3, encryption);
      if (encryption) await expectEncrypted(repo);
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
          await backupAndCopy(repo, disk, copies);
        }
      };
      const journal = join(repo, 'disks', 'vm', 'merge.json');
      // One uninterrupted cycle measures the whole run and the merge window (while merge.json exists).
      await twoBackups();
      const runMs = timed(['prune', repo, '--keep-last', '3']);
      let interrupted = 0;
      for (let k = 0; k < kills; k++) {
        // Two new backups, then a prune that merges two: killed somewhere in it.
        await twoBackups();
        const child = spawn(process.execPath, [CLI, 'prune', repo, '--keep-last', '3'], { stdio: 'ignore', env: cliEnv() });
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
        // (In this process, through the store's API: the code `vhdvault prune` runs, without a Node start-up.)
        const rerun = await prune(await Repository.open(repo), undefined, { policy: { last: 3 } });
        expect(rerun.refused).toEqual([]);
        expect(existsSync(journal)).toBe(false);
        const rows = await list(repo);
        expect(rows).toHaveLength(3);
        if (k % 6 === 5 || k === kills - 1) await expectSound(repo, layout, copies, rows);
      }
      // The kills must really have landed inside merges, or this test proves nothing.
      expect(interrupted, `${interrupted} of ${kills} kills interrupted a merge`).toBeGreaterThanOrEqual(kills / 6);
      expect(vhdvault('verify', repo).code).toBe(0);
    });
  });
}
