// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
/**
 * Merge and prune driven in this process through the store's API (no CLI):
 * `Repository.init/open`, `backup()`, `prune()`, `mergeForward()`, `restore()`,
 * `verify()`, for each layout on a local folder. After every merge, every
 * listed backup restores byte for byte as the disk was when it was taken,
 * verify finds nothing, and each backup's recorded size is plausible. The CLI's
 * own merge and prune tests are prune.test.ts, pruneKill*.test.ts and
 * objectStore.test.ts.
 */
import { randomBytes } from 'node:crypto';
import { copyFile, open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { backup } from '../src/store/backup.js';
import { withExclusiveAccess } from '../src/store/access.js';
import { withDiskLock } from '../src/store/lock.js';
import { mergeForward } from '../src/store/merge.js';
import { prune } from '../src/store/prune.js';
import { type BackupMetadata, type LayoutName as Layout, Repository } from '../src/store/repository.js';
import { restore } from '../src/store/restore.js';
import { verify } from '../src/store/verify.js';
import type { Compression } from '../src/vhd/compression.js';
import { makeRaw, sameBytes, tempDir } from './helpers/files.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BLOCK = 2 * MiB;
const BLOCKS = 8;
const SIZE = BLOCKS * BLOCK;
const DISK = 'vm';

const dir = await tempDir('vhdvault-merge-');
// An objects-layout repository on an object store caches block maps locally; a folder does not, but keep any cache here.
process.env.VHDVAULT_CACHE_DIR = join(dir, 'cache');

/** A change to the source disk: whole blocks of new random data, random bytes inside a block, or a block of zeros. */
type Change = { block: number; kind: 'whole' | 'partial' | 'zero' };

async function change(raw: string, changes: Change[]): Promise<void> {
  const fh = await open(raw, 'r+');
  try {
    for (const { block, kind } of changes) {
      if (kind === 'whole') await fh.write(randomBytes(BLOCK), 0, BLOCK, block * BLOCK);
      else if (kind === 'zero') await fh.write(Buffer.alloc(BLOCK), 0, BLOCK, block * BLOCK);
      // 64 KiB at an odd sector inside the block: the rest of the block is the parent's data.
      else await fh.write(randomBytes(64 * KiB), 0, 64 * KiB, block * BLOCK + 37 * 512);
    }
  } finally {
    await fh.close();
  }
}

interface Case {
  name: string;
  layout: Layout;
  compression: Compression;
}

const CASES: Case[] = [
  { name: 'dir', layout: 'dir', compression: 'none' },
  { name: 'dir, gzip', layout: 'dir', compression: 'gzip' },
  { name: 'vhd', layout: 'vhd', compression: 'none' },
  { name: 'objects (local folder)', layout: 'objects', compression: 'none' },
];

let n = 0;

for (const c of CASES) {
  describe(`merge and prune in process (layout ${c.name})`, () => {
    /** A chain under test: its repository, its source disk, and the disk's content at each backup. */
    class Chain {
      readonly copies = new Map<string, string>();
      /** The blocks each backup stores, each as data or as zeros (dir and vhd layouts: what its data file holds). */
      readonly stored = new Map<string, Map<number, 'data' | 'zero'>>();
      private constructor(
        readonly root: string,
        readonly raw: string,
        public repo: Repository,
      ) {}

      static async create(): Promise<Chain> {
        const root = join(dir, `repo-${n++}`);
        const repo = await Repository.init(root, { layout: c.layout, compression: c.compression });
        const raw = `${root}.raw`;
        // Every block holds data: the full backup stores them all.
        await makeRaw(raw, SIZE, [[0, SIZE]]);
        return new Chain(root, raw, repo);
      }

      /** Change the disk, back it up, and keep a copy of the disk as it was. */
      async backup(changes: Change[], full = false): Promise<BackupMetadata> {
        await change(this.raw, changes);
        const report = await backup(this.repo, DISK, { source: this.raw, full, concurrency: 1 });
        const copy = `${this.raw}-${report.id}`;
        await copyFile(this.raw, copy);
        this.copies.set(report.id, copy);
        const parent = report.parent;
        expect(report.kind).toBe(parent === null ? 'full' : 'delta');
        // A full stores every block with data (all of them here); a delta, the blocks that changed, zeros
        // included (the objects layout stores no object for zeros: its map says so).
        const stored = parent === null ? [...Array(BLOCKS).keys()].map((b) => [b, 'data'] as const) : changes.map((x) => [x.block, x.kind === 'zero' ? 'zero' : 'data'] as const);
        this.stored.set(report.id, new Map(stored));
        expect(report.blocksWritten).toBe(stored.filter(([, what]) => c.layout !== 'objects' || what === 'data').length);
        return this.repo.backup(DISK, report.id);
      }

      /** What the merge of `parent` into `child` leaves the child storing (a merged full stores every block with data). */
      merged(parent: string, child: string): void {
        this.stored.set(child, new Map([...this.stored.get(parent)!, ...this.stored.get(child)!]));
        this.stored.delete(parent);
      }

      /**
       * The listing is a chain from a full; every listed backup (exactly `ids`)
       * restores byte for byte as the disk was; verify finds nothing; each
       * backup's recorded size fits what it stores.
       */
      async expectSound(ids: string[]): Promise<BackupMetadata[]> {
        this.repo = await Repository.open(this.root);
        const rows = await this.repo.backups(DISK);
        expect(rows.map((r) => r.id)).toEqual(ids);
        expect(rows[0]!.kind).toBe('full');
        expect(rows[0]!.parent).toBeNull();
        rows.slice(1).forEach((r, i) => {
          expect(r.kind).toBe('delta');
          expect(r.parent).toBe(rows[i]!.id);
        });
        for (const row of rows) {
          const out = join(dir, `restored-${n++}.raw`);
          const report = await restore(this.repo, DISK, out, { backup: row.id, format: 'raw' });
          expect(report.id).toBe(row.id);
          expect(await sameBytes(out, this.copies.get(row.id)!), `backup ${row.id} restores as the disk was`).toBe(true);
          await rm(out);
        }
        const v = await verify(this.repo);
        expect(v.problems).toEqual([]);
        expect(v.backups).toBe(rows.length);
        for (const row of rows) await this.expectPlausibleSize(row);
        return rows;
      }

      private async expectPlausibleSize(meta: BackupMetadata): Promise<void> {
        const what = `bytesStored of ${meta.id} (${meta.kind})`;
        // Random data does not compress: every stored block costs about a block (compressed zeros, next to nothing).
        const stored = [...this.stored.get(meta.id)!.values()];
        const blocks = stored.length;
        const data = c.compression === 'none' ? blocks : stored.filter((what) => what === 'data').length;
        const map = meta.blockCount * 32;
        if (c.layout === 'objects') {
          // The block map plus the blocks it changed against its parent (estimated after a merge).
          expect(meta.bytesStored, what).toBeGreaterThanOrEqual(map);
          expect(meta.bytesStored, what).toBeLessThanOrEqual(map + meta.blocksWritten * (BLOCK + 64 * KiB));
          expect(meta.bytesStored, what).toBeGreaterThanOrEqual(map + meta.blocksWritten * BLOCK * 0.99);
          return;
        }
        // What the data and digests really occupy, recounted by the merge; headers, bitmaps and digests are small.
        const actual = await this.repo.storedBytes([this.repo.dataKey(meta), this.repo.digestsKey(DISK, meta.id)]);
        expect(meta.bytesStored, what).toBe(actual);
        expect(meta.bytesStored, what).toBeGreaterThanOrEqual(data * BLOCK);
        expect(meta.bytesStored, what).toBeLessThanOrEqual(blocks * (BLOCK + 64 * KiB) + 256 * KiB);
      }
    }

    /** mergeForward as prune runs it: holding the disk's lock, once no reader is left. */
    const merge = (chain: Chain, parent: BackupMetadata, child: BackupMetadata) =>
      withDiskLock(chain.repo, DISK, 'prune', (lock) => withExclusiveAccess(chain.repo, DISK, lock, () => mergeForward(chain.repo, parent, child)));

    describe('prune', () => {
      let chain: Chain;
      let ids: string[];
      beforeAll(async () => {
        chain = await Chain.create();
        // A full, then deltas that overlap one another: whole blocks, a few sectors inside a block, a block become zeros.
        const steps: Change[][] = [
          [],
          [{ block: 1, kind: 'whole' }, { block: 2, kind: 'whole' }],
          [{ block: 2, kind: 'partial' }, { block: 3, kind: 'whole' }],
          [{ block: 5, kind: 'partial' }, { block: 6, kind: 'zero' }],
          [{ block: 0, kind: 'whole' }, { block: 6, kind: 'whole' }, { block: 7, kind: 'partial' }],
        ];
        ids = [];
        for (const step of steps) ids.push((await chain.backup(step)).id);
      });

      it('keep-last 2 merges the three oldest forward: the kept backups restore exactly, verify is clean, sizes fit', async () => {
        const report = await prune(chain.repo, DISK, { policy: { last: 2 } });
        expect(report.refused).toEqual([]);
        expect(report.merged).toBe(3);
        expect(report.merges).toEqual([
          { removed: ids[0], into: ids[1] },
          { removed: ids[1], into: ids[2] },
          { removed: ids[2], into: ids[3] },
        ]);
        expect(report.removed).toEqual(ids.slice(0, 3));
        expect(report.kept).toEqual(ids.slice(3));
        for (let i = 0; i < 3; i++) chain.merged(ids[i]!, ids[i + 1]!);
        await chain.expectSound(ids.slice(3));
        // Nothing more to do: the same policy again changes nothing.
        const before = await chain.repo.backups(DISK);
        const again = await prune(chain.repo, DISK, { policy: { last: 2 } });
        expect(again.merged).toBe(0);
        expect(again.removed).toEqual([]);
        expect(await chain.repo.backups(DISK)).toEqual(before);
      });

      it('keep-last 1 after two more backups merges everything into the newest, which becomes the full', async () => {
        ids.push((await chain.backup([{ block: 4, kind: 'whole' }, { block: 3, kind: 'partial' }])).id);
        ids.push((await chain.backup([{ block: 1, kind: 'zero' }])).id);
        const report = await prune(chain.repo, DISK, { policy: { last: 1 } });
        expect(report.refused).toEqual([]);
        expect(report.merged).toBe(3);
        expect(report.kept).toEqual([ids.at(-1)]);
        for (let i = 3; i < 6; i++) chain.merged(ids[i]!, ids[i + 1]!);
        const [only] = await chain.expectSound([ids.at(-1)!]);
        expect(only!.kind).toBe('full');
        // A delta on the merged full still works, and prunes to itself.
        const next = await chain.backup([{ block: 2, kind: 'whole' }]);
        expect(next.parent).toBe(only!.id);
        await chain.expectSound([only!.id, next.id]);
        expect((await prune(chain.repo, DISK, { policy: { last: 1 } })).merged).toBe(1);
        chain.merged(only!.id, next.id);
        await chain.expectSound([next.id]);
      });
    });

    describe('mergeForward', () => {
      it('folds a delta into a delta parent whose blocks it partially overlaps, then into the full', async () => {
        const chain = await Chain.create();
        const full = await chain.backup([]);
        // The parent stores blocks 0-3; the child 2-5 (2 only a few sectors, 4 become zeros); its child 3 and 6.
        const parent = await chain.backup([0, 1, 2, 3].map((block) => ({ block, kind: 'whole' as const })));
        const child = await chain.backup([
          { block: 2, kind: 'partial' },
          { block: 3, kind: 'whole' },
          { block: 4, kind: 'zero' },
          { block: 5, kind: 'partial' },
        ]);
        const top = await chain.backup([{ block: 3, kind: 'partial' }, { block: 6, kind: 'whole' }]);
        const before = await chain.repo.backups(DISK);
        expect(before.map((b) => b.id)).toEqual([full.id, parent.id, child.id, top.id]);
        // A backup that is not the given parent's child is refused, and nothing changes.
        await expect(merge(chain, full, child)).rejects.toThrow(/not a child/);
        expect(await chain.repo.backups(DISK)).toEqual(before);

        await merge(chain, parent, child);
        chain.merged(parent.id, child.id);
        const rows = await chain.expectSound([full.id, child.id, top.id]);
        // The merged backup keeps the child's identity in the parent's place.
        expect(rows[1]).toMatchObject({ id: child.id, uuid: child.uuid, createdAt: child.createdAt, kind: 'delta', parent: full.id });

        // Into a full parent: the result is a full backup of the child's content.
        await merge(chain, full, rows[1]!);
        chain.merged(full.id, child.id);
        const after = await chain.expectSound([child.id, top.id]);
        expect(after[0]).toMatchObject({ id: child.id, uuid: child.uuid, kind: 'full', parent: null });
        expect(after[1]!.parent).toBe(child.id);
      });
    });
  });
}
