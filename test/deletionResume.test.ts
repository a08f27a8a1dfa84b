/**
 * A deletion interrupted between its two first steps: on an object store the
 * deletion intent is a copy of the backup's metadata, written before the
 * metadata is deleted, so a kill (or a failed DELETE) there leaves both. The
 * next command that cleans the disk must finish the deletion, not leave a
 * listed backup whose block map it then removes.
 */
import { copyFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { prune } from '../src/store/prune.js';
import { Repository } from '../src/store/repository.js';
import { verify } from '../src/store/verify.js';
import { tempDir } from './helpers/files.js';
import { backupOf, expectEncrypted, initRepo, listed, useTestPassword } from './helpers/store.js';

const MiB = 1024 * 1024;

// The encrypted repository's password (VHDVAULT_PASSWORD), for this process.
useTestPassword();

describe('a deletion whose intent and metadata both exist', () => {
  // Also encrypted: the intent is a byte copy of the sealed metadata, bound to the metadata's key, so it must open as the intent.
  for (const encryption of [undefined, 'aes-256-gcm'] as const) {
    it(`is finished by the next prune: the backup is gone, the rest is sound (objects layout${encryption ? `, encrypted with ${encryption}` : ''})`, async () => {
      const dir = await tempDir();
      const root = join(dir, 'repo');
      await initRepo(root, 'objects', 'none', encryption);
      const disk = join(dir, 'disk.raw');
      const ids: string[] = [];
      for (let i = 0; i < 3; i++) {
        await writeFile(disk, Buffer.alloc(4 * MiB, i + 1));
        ids.push(await backupOf(root, 'vm', disk));
      }
      if (encryption) await expectEncrypted(root);
      // The newest backup, its deletion begun: intent written, metadata not yet deleted.
      const folder = join(root, 'disks', 'vm');
      const victim = ids[2]!;
      await copyFile(join(folder, `${victim}.json`), join(folder, `.${victim}.deleting.tmp`));

      const repo = await Repository.open(root);
      const report = await prune(repo, 'vm', { policy: { last: 3 } });
      expect(report.refused).toEqual([]);
      expect((await listed(root, 'vm')).map((b) => b.id)).toEqual(ids.slice(0, 2));
      const names = await readdir(folder);
      expect(names.filter((n) => n.includes(victim))).toEqual([]);
      const check = await verify(repo, 'vm');
      expect(check.problems).toEqual([]);
      expect(check.backups).toBe(2);
      // And the disk takes new backups (a delta over the remaining chain).
      await writeFile(disk, Buffer.alloc(4 * MiB, 9));
      await backupOf(root, 'vm', disk);
      expect((await listed(root, 'vm')).length).toBe(3);
    });
  }
});
