/**
 * Retention merge speed, dir layout (renames + metadata remap) against vhd
 * layout (block copies into the parent file), with tinybench.
 *
 *   npm run bench:merge              # 1 GiB and 8 GiB, 10% and 50% of blocks changed
 *   npm run bench:merge -- --json
 *
 * Environment: BENCH_DIR (where chains are built; default the current folder),
 * BENCH_SIZES (GiB, comma separated; default 1,8), BENCH_ITERATIONS (default 2).
 * Each iteration builds the same chain (a full backup with every block, a delta
 * changing the given share of blocks) in `beforeEach`, untimed; the timed task is
 * the merge up to its commit. Freeing the replaced data afterwards is reported apart.
 * Goals (issue): dir ≥ 50× faster than vhd at 1 GiB / 50%; dir time depends on the
 * changed-block count, not the disk size.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { Bench } from 'tinybench';
import { buildMergeChain, changedBlocks, type MergeChain } from './measure/merge.js';
import { mergeForward, reclaimMergeSpace } from '../src/store/merge.js';
import { writeResults } from './lib.js';

const GiB = 1024 ** 3;

async function main(): Promise<void> {
  const json = process.argv.includes('--json');
  const sizes = (process.env.BENCH_SIZES ?? '1,8').split(',').map((s) => Number(s) * GiB);
  const iterations = Number(process.env.BENCH_ITERATIONS ?? 2);
  const root = await mkdtemp(join(resolve(process.env.BENCH_DIR ?? '.'), '.vhdvault-bench-merge-'));
  const rows: Array<{ layout: string; size: number; changedBlocks: number; mergeMs: number; reclaimMs: number }> = [];
  try {
    for (const size of sizes) {
      for (const percent of ['10%', '50%']) {
        const count = changedBlocks(percent, size / (2 * 1024 * 1024));
        const bench = new Bench({ iterations, time: 0, warmup: false });
        const reclaim: Record<string, number[]> = {};
        for (const layout of ['dir', 'vhd'] as const) {
          let chain: MergeChain;
          let n = 0;
          bench.add(
            layout,
            async () => {
              await mergeForward(chain.repo, chain.parent, chain.child, { reclaim: false });
            },
            {
              beforeEach: async () => {
                chain = await buildMergeChain(join(root, `${layout}-${n++}`), layout, size, count);
              },
              afterEach: async () => {
                const start = performance.now();
                await reclaimMergeSpace(chain.repo, chain.parent, chain.child);
                (reclaim[layout] ??= []).push(performance.now() - start);
                await rm(chain.repo.root, { recursive: true, force: true });
              },
            },
          );
        }
        await bench.run();
        for (const task of bench.tasks) {
          const result = task.result as { latency?: { p50?: number; mean?: number } } | undefined;
          const ms = result?.latency?.p50 ?? result?.latency?.mean ?? NaN;
          const r = reclaim[task.name] ?? [];
          rows.push({ layout: task.name, size, changedBlocks: count, mergeMs: Math.round(ms * 10) / 10, reclaimMs: Math.round((r.reduce((a, b) => a + b, 0) / Math.max(1, r.length)) * 10) / 10 });
        }
      }
    }
  } finally {
    await rm(root, { recursive: true, force: true });
  }
  await writeResults('merge', { sizesGiB: sizes.map((s) => s / GiB), iterations }, rows);
  if (json) return console.log(JSON.stringify(rows, null, 2));
  console.log(`merge benchmark (tinybench, ${iterations} iterations, median), chains under ${process.env.BENCH_DIR ?? 'the current folder'}`);
  console.log('layout  disk size  changed blocks  merge ms  blocks/s  dir speed-up  then reclaim ms');
  for (const r of rows) {
    const other = rows.find((o) => o.size === r.size && o.changedBlocks === r.changedBlocks && o.layout === 'vhd')!;
    const speedup = r.layout === 'dir' ? `${(other.mergeMs / r.mergeMs).toFixed(1)}×` : '';
    console.log(
      `${r.layout.padEnd(6)}  ${`${r.size / GiB} GiB`.padStart(9)}  ${String(r.changedBlocks).padStart(14)}  ${r.mergeMs.toFixed(1).padStart(8)}  ${String(Math.round((r.changedBlocks / r.mergeMs) * 1000)).padStart(8)}  ${speedup.padStart(12)}  ${r.reclaimMs.toFixed(1).padStart(15)}`,
    );
  }
}

await main();
