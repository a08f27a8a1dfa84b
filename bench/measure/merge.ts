import { randomFillSync } from 'node:crypto';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { UsageError } from '../../src/util/errors.js';
import { fullBitmap } from '../../src/vhd/bitmap.js';
import { newUuid } from '../../src/vhd/uuid.js';
import type { OnProgress } from '../../src/util/progress.js';
import { DigestList, SHA256_DIGESTER } from '../../src/store/digests.js';
import { mergeForward, reclaimMergeSpace } from '../../src/store/merge.js';
import { newBackupId } from '../../src/store/names.js';
import { type BackupMetadata, type LayoutName as Layout, newBackupMetadata, Repository } from '../../src/store/repository.js';

const BLOCK = 2 * 1024 * 1024;

export interface MergeChain {
  repo: Repository;
  parent: BackupMetadata;
  child: BackupMetadata;
}

/** "10%" → 10% of the blocks; "300" → 300 blocks. */
export function changedBlocks(spec: string, blockCount: number): number {
  const m = /^(\d+(?:\.\d+)?)(%?)$/.exec(spec.trim());
  if (!m) throw new UsageError(`--changed must be a percentage (10%) or a block count (300), got "${spec}"`);
  const n = m[2] ? Math.round((Number(m[1]) / 100) * blockCount) : Number(m[1]);
  if (!Number.isInteger(n) || n < 1 || n > blockCount) throw new UsageError(`--changed gives ${n} blocks; the disk has ${blockCount}`);
  return n;
}

/**
 * A repository holding one disk's full backup (every block stored) and a delta
 * changing `changed` blocks spread evenly over the disk, in the given layout,
 * written directly with the repository's formats (no hashing of the source).
 */
export async function buildMergeChain(root: string, layout: Layout, size: number, changed: number, onBlockWritten?: () => void): Promise<MergeChain> {
  if (size % BLOCK !== 0) throw new UsageError('--size must be a multiple of 2M');
  const repo = await Repository.init(root, { layout, compression: 'none' });
  const disk = 'bench';
  await mkdir(repo.diskDir(disk), { recursive: true });
  const blockCount = size / BLOCK;
  const base = randomFillSync(Buffer.alloc(BLOCK));
  const update = randomFillSync(Buffer.alloc(BLOCK));
  const step = blockCount / changed;
  const changedSet = new Set(Array.from({ length: changed }, (_, i) => Math.floor(i * step)));

  const write = async (parent: BackupMetadata | null): Promise<BackupMetadata> => {
    const id = newBackupId(parent?.id);
    const uuid = newUuid();
    const writer = await repo.layout.createWriter(repo, { disk, id, size, blockCount, uuid, parent, previous: null });
    const digests = new DigestList(blockCount);
    const bitmap = fullBitmap(BLOCK);
    let written = 0;
    for (let b = 0; b < blockCount; b++) {
      const isChanged = changedSet.has(b);
      if (!parent || isChanged) {
        await writer.storeBlock(b, { bitmap, data: parent ? update : base });
        written++;
        onBlockWritten?.();
      }
      digests.append(SHA256_DIGESTER.of(parent && isChanged ? update : base));
    }
    await writer.finish(digests.bytes);
    const bytesWritten = written * (BLOCK + 512);
    const meta = newBackupMetadata(repo, { disk, id, parent: parent?.id ?? null, size, blockCount, uuid, blocksWritten: written, bytesWritten, bytesStored: await writer.storedBytes(bytesWritten) }, digests.bytes);
    await repo.commitBackup(meta, digests.bytes);
    return meta;
  };
  const parent = await write(null);
  const child = await write(parent);
  return { repo, parent, child };
}

export interface MergeRow {
  layout: Layout;
  size: number;
  changedBlocks: number;
  /** Until the merged backup is committed (journal gone). */
  mergeMs: number;
  /** Then freeing what the merge set aside (replaced blocks, the child's old data). */
  reclaimMs: number;
  blocksPerSecond: number;
  /** vhd merge time ÷ dir merge time (on the dir row; 1 on the vhd row). */
  dirSpeedup: number;
}

/**
 * Build the same chain in both layouts under `dir`, merge the delta into the
 * full (what prune does when it removes the full), and time the merge alone.
 */
export async function benchMerge(options: { dir: string; size: number; changed: string; onProgress?: OnProgress }): Promise<MergeRow[]> {
  const work = await mkdtemp(join(options.dir, '.vhdvault-bench-merge-'));
  try {
    const count = changedBlocks(options.changed, options.size / BLOCK);
    const rows: MergeRow[] = [];
    // Progress, in blocks: each layout writes a full chain and a delta, then merges the delta (counted when done, outside the timing).
    const total = 2 * (options.size / BLOCK + 2 * count);
    let done = 0;
    const advance = (blocks: number) => options.onProgress?.((done += blocks), total, done * BLOCK);
    for (const layout of ['dir', 'vhd'] as const) {
      const chain = await buildMergeChain(join(work, layout), layout, options.size, count, () => advance(1));
      const start = performance.now();
      await mergeForward(chain.repo, chain.parent, chain.child, { reclaim: false });
      const mergeMs = performance.now() - start;
      await reclaimMergeSpace(chain.repo, chain.parent, chain.child);
      const reclaimMs = performance.now() - start - mergeMs;
      advance(count);
      const round = (n: number) => Math.round(n * 10) / 10;
      rows.push({ layout, size: options.size, changedBlocks: count, mergeMs: round(mergeMs), reclaimMs: round(reclaimMs), blocksPerSecond: Math.round((count / mergeMs) * 1000), dirSpeedup: 1 });
      await rm(join(work, layout), { recursive: true, force: true });
    }
    const [dirRow, vhdRow] = rows as [MergeRow, MergeRow];
    dirRow.dirSpeedup = Math.round((vhdRow.mergeMs / dirRow.mergeMs) * 10) / 10;
    return rows;
  } finally {
    await rm(work, { recursive: true, force: true });
  }
}

export function formatMergeRows(rows: MergeRow[]): string {
  const gib = (n: number) => `${(n / 2 ** 30).toFixed(n % 2 ** 30 === 0 ? 0 : 2)} GiB`;
  const lines = ['layout  disk size  changed blocks  merge time   blocks/s  dir/vhd speed  then reclaim'];
  for (const r of rows) {
    lines.push(
      `${r.layout.padEnd(6)}  ${gib(r.size).padStart(9)}  ${String(r.changedBlocks).padStart(14)}  ${`${r.mergeMs.toFixed(1)} ms`.padStart(10)}  ${String(r.blocksPerSecond).padStart(9)}  ${(r.layout === 'dir' ? `${r.dirSpeedup}×` : '').padStart(13)}  ${r.reclaimMs.toFixed(1)} ms`,
    );
  }
  return lines.join('\n');
}
