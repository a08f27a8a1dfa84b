/**
 * What a power loss right after a merge's commit can leave. The commit is
 * durable; what follows it is not (docs/design/04-repository.md §4.9): the
 * journal's removal, the removed backup's deletion intent and the freeing of
 * the set-aside blocks and of the child's old data. A crash that undoes them
 * brings all of them back. This puts back what it would leave and checks that
 * the next prune finishes it: the journal's rerun changes no backup, the
 * garbage goes, and nothing else does. A SIGKILL never undoes a finished
 * system call, so the kill tests (pruneKill*.test.ts) cannot reach this state.
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { Cipher } from '../src/crypto/aead.js';
import { deletingKey, mergeJournalKey } from '../src/store/keys.js';
import { mergeForward } from '../src/store/merge.js';
import { metadataText } from '../src/store/metadata.js';
import { type BackupMetadata, Repository } from '../src/store/repository.js';
import { vhdvault } from './helpers/cli.js';
import { tempDir } from './helpers/files.js';
import { expectSound, list, makeChain } from './helpers/pruneChain.js';
import { useTestPassword } from './helpers/store.js';

const dir = await tempDir();
useTestPassword();

/** Merge the oldest backup into the next, then put back what a power loss after the commit could leave. */
async function crashAfterCommit(root: string): Promise<void> {
  const repo = await Repository.open(root);
  const [parent, child] = (await repo.backups('vm')) as [BackupMetadata, BackupMetadata];
  const { merge } = repo.layoutOf(child);
  const journal = { format: 1, parent, child, step: 'metadata', ...(await merge.begin(repo, parent, child)) };
  await mergeForward(repo, parent, child, { reclaim: false });
  await repo.writeJson(mergeJournalKey('vm'), journal);
  await repo.storage.put(deletingKey('vm', parent.id), metadataText(parent));
}

describe('a power loss between a merge commit and its freeing', () => {
  for (const encryption of [undefined, 'aes-256-gcm'] as Array<Cipher | undefined>) {
    it(`leaves garbage that the next prune frees, and nothing else (${encryption ?? 'plain'})`, async () => {
      const root = join(dir, encryption ?? 'plain');
      const copies = await makeChain(root, 'dir', 3, encryption);
      await crashAfterCommit(root);
      const folder = join(root, 'disks', 'vm');
      const left = await readdir(folder);
      expect(left.filter((n) => n.endsWith('.tmp') || n === 'merge.json').length, left.join(' ')).toBe(4);
      const before = await list(root);
      expect(before).toHaveLength(2);

      const r = vhdvault('prune', root, '--keep-last', '2');
      expect(r.code, r.stderr).toBe(0);
      expect(await list(root)).toEqual(before);
      await expectSound(root, 'dir', copies);
      expect(vhdvault('verify', root).code).toBe(0);
    });
  }
});
