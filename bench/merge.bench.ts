/**
 * Retention merge speed, dir layout (renames + metadata remap) against vhd
 * layout (block copies into the parent file), with tinybench; then the dir
 * merge against Xen Orchestra's vhd-lib merging the same VHD directories.
 *
 *   npm run bench:merge              # 1 GiB and 8 GiB, 10% and 50% of blocks changed; then vhd-lib
 *   npm run bench:merge -- --json
 *   BENCH_MERGE_PARTS=vhd-lib npm run bench:merge     # only the comparison with vhd-lib
 *
 * Environment: BENCH_DIR (where chains are built; default the current folder),
 * BENCH_SIZES (GiB, comma separated; default 1,8), BENCH_ITERATIONS (default 2),
 * BENCH_MERGE_PARTS (`layouts`, `vhd-lib` or both, comma separated; default both).
 * Each iteration builds the same chain (a full backup with every block, a delta
 * changing the given share of blocks) in `beforeEach`, untimed; the timed task is
 * the merge up to its commit. Freeing the replaced data afterwards is reported apart.
 * Goals (issue): dir ≥ 50× faster than vhd at 1 GiB / 50%; dir time depends on the
 * changed-block count, not the disk size.
 *
 * The vhd-lib part (issue 23; goal: our merge, freeing the replaced blocks
 * included, ≥ 3× faster than vhd-lib's at 1 and 8 GiB) needs vhd-lib, which
 * is not a dependency of vhdvault: install it on demand with
 *
 *   npm --prefix bench/vhd-lib install
 *
 * (its own package.json pins vhd-lib 4.15.0; without it the part is skipped
 * with a line saying so). Each round builds the same chain (256 changed blocks,
 * BENCH_VHDLIB_CHANGED) three times, syncs, and runs, in an order that
 * alternates: our merge in this process (to its commit, then the freeing),
 * vhd-lib's mergeVhdChain in a child process (bench/vhd-lib/merge.mjs, over
 * aliases as XO lays them out; it frees the replaced blocks by renaming over
 * them), and `vhdvault prune --keep-last 1` as a whole process against the
 * vhd-lib process's wall time. BENCH_ROUNDS rounds (default 5), medians.
 * Results: bench/results/merge-vhd-lib.json.
 */
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { loadavg } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Bench } from 'tinybench';
import { buildMergeChain, changedBlocks, type MergeChain } from './measure/merge.js';
import { mergeForward, reclaimMergeSpace } from '../src/store/merge.js';
import { envInt, formatTable, median, mustRun, syncAll, writeResults } from './lib.js';

const GiB = 1024 ** 3;

async function layoutsPart(json: boolean, sizes: number[]): Promise<void> {
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

// ---------------------------------------------------------------- against vhd-lib

const VHD_LIB = fileURLToPath(new URL('../../bench/vhd-lib/', import.meta.url));
const CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));

/** One round's times, in ms: ours in-process (to the commit, then the freeing), vhd-lib's, and both as whole processes. */
interface PeerRound {
  mergeMs: number;
  reclaimMs: number;
  vhdLibMs: number;
  pruneProcessMs: number;
  vhdLibProcessMs: number;
}

/** The same chain for vhd-lib: its merge wants aliases (`*.alias.vhd` naming each VHD directory), as XO lays backups out. */
async function aliasedChain(chain: MergeChain): Promise<{ folder: string; parent: string; child: string }> {
  const folder = chain.repo.localPath(chain.repo.diskKey(chain.child.disk));
  await writeFile(join(folder, 'parent.alias.vhd'), chain.repo.layout.dataName(chain.parent.id));
  await writeFile(join(folder, 'child.alias.vhd'), chain.repo.layout.dataName(chain.child.id));
  return { folder, parent: 'parent.alias.vhd', child: 'child.alias.vhd' };
}

/** vhd-lib's merge in its own process: its own timing of the merge, and the process's wall time. */
async function runVhdLib(chain: MergeChain): Promise<{ ms: number; processMs: number; version: string }> {
  const { folder, parent, child } = await aliasedChain(chain);
  await syncAll();
  const start = performance.now();
  const out = await mustRun(process.execPath, [join(VHD_LIB, 'merge.mjs'), folder, parent, child]);
  const processMs = performance.now() - start;
  const { ms, vhdLib } = JSON.parse(out.stdout) as { ms: number; vhdLib: string };
  return { ms, processMs, version: vhdLib };
}

async function runOurs(chain: MergeChain): Promise<{ mergeMs: number; reclaimMs: number }> {
  await syncAll();
  const start = performance.now();
  await mergeForward(chain.repo, chain.parent, chain.child, { reclaim: false });
  const mergeMs = performance.now() - start;
  await reclaimMergeSpace(chain.repo, chain.parent, chain.child);
  return { mergeMs, reclaimMs: performance.now() - start - mergeMs };
}

async function runPruneProcess(chain: MergeChain): Promise<number> {
  await syncAll();
  const start = performance.now();
  await mustRun(process.execPath, [CLI, 'prune', chain.repo.root, '--keep-last', '1']);
  return performance.now() - start;
}

/** One round at one size: three copies of the chain, the runs in an order that alternates with the round. */
async function peerRound(root: string, size: number, changed: number, round: number): Promise<PeerRound & { version: string }> {
  const build = (name: string) => buildMergeChain(join(root, `${name}-${round}`), 'dir', size, changed);
  const [ours, theirs, prune] = [await build('ours'), await build('vhd-lib'), await build('prune')];
  try {
    let inProcess: { mergeMs: number; reclaimMs: number } | undefined;
    let vhdLib: { ms: number; processMs: number; version: string } | undefined;
    let pruneProcessMs = NaN;
    const runs = [async () => (inProcess = await runOurs(ours)), async () => (vhdLib = await runVhdLib(theirs)), async () => (pruneProcessMs = await runPruneProcess(prune))];
    for (let i = 0; i < runs.length; i++) await runs[(i + round) % runs.length]!();
    return { ...inProcess!, vhdLibMs: vhdLib!.ms, vhdLibProcessMs: vhdLib!.processMs, pruneProcessMs, version: vhdLib!.version };
  } finally {
    await Promise.all([ours, theirs, prune].map((c) => rm(c.repo.root, { recursive: true, force: true })));
  }
}

async function vhdLibPart(json: boolean, sizes: number[]): Promise<void> {
  if (!existsSync(join(VHD_LIB, 'node_modules', 'vhd-lib'))) {
    console.log('vhd-lib rows skipped: vhd-lib is not installed (npm --prefix bench/vhd-lib install)');
    return;
  }
  const rounds = envInt('BENCH_ROUNDS', 5);
  const changed = envInt('BENCH_VHDLIB_CHANGED', 256);
  const root = await mkdtemp(join(resolve(process.env.BENCH_DIR ?? '.'), '.vhdvault-bench-merge-'));
  const rows = [];
  let version = '';
  try {
    for (const size of sizes) {
      const all: PeerRound[] = [];
      for (let r = 0; r < rounds; r++) {
        const { version: v, ...times } = await peerRound(root, size, changed, r);
        version = v;
        all.push(times);
      }
      rows.push(peerRow(size, changed, all));
    }
  } finally {
    await rm(root, { recursive: true, force: true });
  }
  await writeResults('merge-vhd-lib', { sizesGiB: sizes.map((s) => s / GiB), changedBlocks: changed, rounds }, rows, {
    machine: { load: loadavg().map((l) => Math.round(l * 100) / 100) },
    notes: [`vhd-lib ${version} (mergeVhdChain, its default of 2 blocks in flight, removeUnused), in a child process; vhdvault merge in-process (journal to commit, then the freeing); each round on a fresh chain after sync`],
  });
  if (json) return console.log(JSON.stringify(rows, null, 2));
  const ms = (n: number) => n.toFixed(1);
  console.log(`\nmerge of ${changed} changed blocks against vhd-lib ${version} (median of ${rounds} interleaved rounds, ms)`);
  console.log(
    formatTable(
      ['disk', 'ours to commit', 'then freeing', 'ours in all', 'vhd-lib', 'speed-up (in all)', 'prune process', 'vhd-lib process', 'speed-up (process)'],
      rows.map((r) => [`${r.size / GiB} GiB`, ms(r.mergeMs), ms(r.reclaimMs), ms(r.totalMs), ms(r.vhdLibMs), `${r.speedup.toFixed(2)}×`, ms(r.pruneProcessMs), ms(r.vhdLibProcessMs), `${r.processSpeedup.toFixed(2)}×`]),
    ),
  );
}

/** Medians of the rounds; the speed-ups are vhd-lib's median over ours, with every round's ratio beside them. */
function peerRow(size: number, changed: number, all: PeerRound[]) {
  const m = (f: (r: PeerRound) => number) => Math.round(median(all.map(f)) * 10) / 10;
  const totalMs = m((r) => r.mergeMs + r.reclaimMs);
  const vhdLibMs = m((r) => r.vhdLibMs);
  const round2 = (n: number) => Math.round(n * 100) / 100;
  return {
    size,
    changedBlocks: changed,
    mergeMs: m((r) => r.mergeMs),
    reclaimMs: m((r) => r.reclaimMs),
    totalMs,
    vhdLibMs,
    speedup: round2(vhdLibMs / totalMs),
    speedups: all.map((r) => round2(r.vhdLibMs / (r.mergeMs + r.reclaimMs))),
    pruneProcessMs: m((r) => r.pruneProcessMs),
    vhdLibProcessMs: m((r) => r.vhdLibProcessMs),
    processSpeedup: round2(m((r) => r.vhdLibProcessMs) / m((r) => r.pruneProcessMs)),
  };
}

async function main(): Promise<void> {
  const json = process.argv.includes('--json');
  const sizes = (process.env.BENCH_SIZES ?? '1,8').split(',').map((s) => Number(s) * GiB);
  const parts = (process.env.BENCH_MERGE_PARTS ?? 'layouts,vhd-lib').split(',');
  if (parts.includes('layouts')) await layoutsPart(json, sizes);
  if (parts.includes('vhd-lib')) await vhdLibPart(json, sizes);
}

await main();
