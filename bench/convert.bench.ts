/**
 * Conversion throughput against `cp` of the same file, in the same run.
 *
 *   npm run bench:convert                  # 1 GiB, 7 rounds, table
 *   npm run bench:convert -- --json        # rows as JSON on stdout (facts on stderr)
 *
 * Environment:
 *   BENCH_SIZE_MIB  size of the raw source (default 1024)
 *   BENCH_ROUNDS    rounds, each running every operation once (default 7, at least 3)
 *   BENCH_DIR       directory to work in (default: the OS temp dir); a temp dir is made inside
 *   BENCH_COLD=1    drop the page cache before every timed run (root only; default: warm cache)
 *
 * Every operation reads the same data from the same filesystem. Operations are
 * interleaved (the starting one rotates each round); before each timed run every
 * output is deleted and everything is synced to disk, so no run pays for the
 * previous one's writeback and every run starts just after the previous run's
 * output was freed. (On a VM with virtio-balloon free page reporting, filling the
 * page cache with pages freed seconds ago is several times dearer than with pages
 * freed just now, so this keeps the runs comparable.)
 *
 * convert() fsyncs its output before renaming it into place; plain `cp` does
 * not, so a "cp + fsync" row is shown for reference. With qemu-img on PATH, a
 * row of `qemu-img convert -f vpc -O raw` of the same VHD, its output fsynced
 * (the goal for VHD → raw: at least as fast as it). On a shared machine look at
 * "best s" too: other load inflates single runs.
 * The goal (issue): convert throughput ≥ 0.8 × cp throughput.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { cpus, loadavg, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { convert } from '../src/vhd/convert.js';
import {
  describeFilesystem,
  detectCpMechanism,
  dropCaches,
  envInt,
  formatTable,
  fsyncFile,
  median,
  MiB,
  mustRun,
  runCommand,
  sameContent,
  syncAll,
  timeIt,
  writeRandomFile,
  writeResults,
} from './lib.js';

const GOAL = 0.8;

interface Operation {
  name: string;
  /** Bytes of virtual disk moved (the raw file's size for every operation). */
  bytes: number;
  run(): Promise<unknown>;
  /** Files the run creates; removed before each run and at the end. */
  outputs: string[];
  /** Runs inside this process, so process.cpuUsage() measures it. */
  inProcess: boolean;
}

export interface Row {
  operation: string;
  bytes: number;
  runsSeconds: number[];
  medianSeconds: number;
  /** Fastest run: less sensitive to other load on a shared machine. */
  bestSeconds: number;
  /** Median CPU seconds (user + sys, all threads) of this process; null for cp (a child process). */
  cpuSeconds: { user: number; system: number } | null;
  mibPerSecond: number;
  /** Our throughput / plain cp throughput (the measure). */
  ratioVsCp: number;
  /** Our throughput / (cp then fsync) throughput: same durability as convert. */
  ratioVsCpFsync: number;
  goal: number;
  meetsGoal: boolean | null;
}

async function main(): Promise<void> {
  const json = process.argv.includes('--json');
  const sizeMiB = envInt('BENCH_SIZE_MIB', 1024);
  const rounds = Math.max(3, envInt('BENCH_ROUNDS', 7));
  const cold = process.env.BENCH_COLD === '1';
  const base = process.env.BENCH_DIR || tmpdir();
  const bytes = sizeMiB * MiB;
  const log = (s: string) => (json ? process.stderr : process.stdout).write(s + '\n');
  const progress = (s: string) => process.stderr.write(s + '\n');

  const dir = await mkdtemp(join(base, 'vhdvault-bench-'));
  const cleanup = () => rm(dir, { recursive: true, force: true });
  const onSignal = () => {
    void cleanup().finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  try {
    const loadBefore = loadavg().map((l) => l.toFixed(2)).join(' ');
    const fs = await describeFilesystem(dir);
    const cpHow = await detectCpMechanism(dir);
    if (cold && !(await dropCaches())) throw new Error('BENCH_COLD=1 needs write access to /proc/sys/vm/drop_caches');

    const srcRaw = join(dir, 'source.raw');
    const srcVhd = join(dir, 'source.vhd');
    const outRaw = join(dir, 'out.raw');
    const outVhd = join(dir, 'out.vhd');

    progress(`bench: writing ${sizeMiB} MiB of random data to ${srcRaw} ...`);
    await writeRandomFile(srcRaw, bytes);
    progress('bench: making the VHD input and checking the round trip ...');
    await convert(srcRaw, srcVhd, { format: 'vhd' });
    await convert(srcVhd, outRaw, { format: 'raw' });
    if (!(await sameContent(srcRaw, outRaw))) throw new Error('round trip raw → vhd → raw changed the data');
    await rm(outRaw);

    const ops: Operation[] = [
      { name: 'cp raw (baseline)', bytes, outputs: [outRaw], inProcess: false, run: () => mustRun('cp', [srcRaw, outRaw]) },
      {
        name: 'cp raw + fsync',
        bytes,
        outputs: [outRaw],
        inProcess: false,
        run: async () => {
          await mustRun('cp', [srcRaw, outRaw]);
          await fsyncFile(outRaw);
        },
      },
      { name: 'convert raw → vhd', bytes, outputs: [outVhd], inProcess: true, run: () => convert(srcRaw, outVhd, { format: 'vhd' }) },
      { name: 'convert vhd → raw', bytes, outputs: [outRaw], inProcess: true, run: () => convert(srcVhd, outRaw, { format: 'raw' }) },
    ];
    if ((await runCommand('qemu-img', ['--version']).catch(() => null))?.code === 0) {
      ops.push({
        name: 'qemu-img convert vhd → raw + fsync',
        bytes,
        outputs: [outRaw],
        inProcess: false,
        run: async () => {
          await mustRun('qemu-img', ['convert', '-f', 'vpc', '-O', 'raw', srcVhd, outRaw]);
          await fsyncFile(outRaw);
        },
      });
    }

    const allOutputs = [...new Set(ops.flatMap((o) => o.outputs))];
    const times = new Map<string, number[]>(ops.map((o) => [o.name, []]));
    const cpu = new Map<string, Array<{ user: number; system: number }>>(ops.map((o) => [o.name, []]));
    for (let r = 0; r < rounds; r++) {
      const order = ops.map((_, i) => ops[(i + r) % ops.length]!);
      for (const op of order) {
        // Every output goes, not just this op's: each run then starts right after
        // the previous run's 1 GiB output was freed, whichever op made it (see above).
        await Promise.all(allOutputs.map((p) => rm(p, { force: true })));
        await syncAll();
        if (cold) await dropCaches();
        globalThis.gc?.();
        const cpu0 = process.cpuUsage();
        const s = await timeIt(op.run);
        const used = process.cpuUsage(cpu0);
        times.get(op.name)!.push(s);
        cpu.get(op.name)!.push({ user: used.user / 1e6, system: used.system / 1e6 });
        progress(`bench: round ${r + 1}/${rounds}  ${op.name.padEnd(20)} ${s.toFixed(3)} s`);
      }
    }
    await Promise.all(allOutputs.map((p) => rm(p, { force: true })));

    const throughput = (name: string) => bytes / MiB / median(times.get(name)!);
    const cpRate = throughput('cp raw (baseline)');
    const cpFsyncRate = throughput('cp raw + fsync');
    const rows: Row[] = ops.map((op) => {
      const runs = times.get(op.name)!;
      const rate = throughput(op.name);
      const ours = op.name.startsWith('convert');
      return {
        operation: op.name,
        bytes: op.bytes,
        runsSeconds: runs.map((s) => Number(s.toFixed(4))),
        medianSeconds: Number(median(runs).toFixed(4)),
        bestSeconds: Number(Math.min(...runs).toFixed(4)),
        cpuSeconds: op.inProcess
          ? {
              user: Number(median(cpu.get(op.name)!.map((c) => c.user)).toFixed(3)),
              system: Number(median(cpu.get(op.name)!.map((c) => c.system)).toFixed(3)),
            }
          : null,
        mibPerSecond: Number(rate.toFixed(1)),
        ratioVsCp: Number((rate / cpRate).toFixed(3)),
        ratioVsCpFsync: Number((rate / cpFsyncRate).toFixed(3)),
        goal: GOAL,
        meetsGoal: ours ? rate / cpRate >= GOAL : null,
      };
    });

    log(
      `vhdvault convert benchmark — ${sizeMiB} MiB random raw source, ${rounds} rounds (interleaved), ` +
        `${cold ? 'cold' : 'warm'} page cache\n` +
        `node ${process.version}, ${cpus().length} CPUs, ${Math.round(totalmem() / MiB / 1024)} GiB RAM, ` +
        `load average ${loadBefore} before / ${loadavg().map((l) => l.toFixed(2)).join(' ')} after; ` +
        `work dir ${dir} (${fs})\n` +
        `cp copies with: ${cpHow}\n` +
        `goal: convert throughput ≥ ${GOAL}× cp throughput (ratio column "vs cp"); convert fsyncs its output, plain cp does not`,
    );
    await writeResults('convert', { sizeMiB, rounds, pageCache: cold ? 'dropped before each run' : 'warm', filesystem: fs, cp: cpHow }, rows, { name: cold ? 'convert-cold' : 'convert' });
    if (json) {
      process.stdout.write(JSON.stringify(rows, null, 2) + '\n');
    } else {
      const table = formatTable(
        ['operation', 'bytes', 'median s', 'MiB/s', 'vs cp', 'vs cp+fsync', `goal ≥${GOAL}× cp`, 'best s', 'cpu user/sys s', 'runs (s)'],
        rows.map((r) => [
          r.operation,
          String(r.bytes),
          r.medianSeconds.toFixed(3),
          r.mibPerSecond.toFixed(1),
          `${r.ratioVsCp.toFixed(2)}×`,
          `${r.ratioVsCpFsync.toFixed(2)}×`,
          r.meetsGoal === null ? '—' : r.meetsGoal ? 'met' : 'NOT met',
          r.bestSeconds.toFixed(3),
          r.cpuSeconds ? `${r.cpuSeconds.user.toFixed(2)}/${r.cpuSeconds.system.toFixed(2)}` : '—',
          r.runsSeconds.map((s) => s.toFixed(2)).join(' '),
        ]),
      );
      log('\n' + table);
    }
  } finally {
    await cleanup();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}

main().catch((err: unknown) => {
  console.error(err instanceof Error ? (err.stack ?? err.message) : err);
  process.exitCode = 1;
});
