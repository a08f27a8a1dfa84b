/**
 * Encrypted repositories against plain ones, in the same script
 * (docs/design/12-encryption.md).
 *
 *   npm run bench:crypto              # 1 GiB disk, 3 rounds, tables
 *   npm run bench:crypto -- --json    # the results as JSON on stdout
 *
 * Environment: BENCH_SIZE_MIB (the disk, default 1024), or BENCH_SIZE (a size with a unit: 64M, 1G),
 * BENCH_ROUNDS (default 3), BENCH_DIR (where to work; default the system's
 * temporary folder, a local filesystem).
 *
 * The disk is seeded (writeSeededDisk in bench/lib.ts): pseudo-random data with
 * runs of zero blocks (10% of the blocks), and a second image of it with 5% of
 * its data blocks rewritten whole (rewriteSeededBlocks): the same bytes every run.
 * For each layout (dir, objects; compression none, on a local folder) and each
 * configuration (plain, aes-256-gcm, chacha20-poly1305), in-process through the
 * API (no CLI start-up), a new repository and then, each step timed alone after
 * a `sync`:
 *   1. full backup of the disk,
 *   2. delta backup of the rewritten image (every block read and digested, the
 *      changed ones stored),
 *   3. restore of the latest backup to a raw file (restore fsyncs it before it
 *      appears; checked equal to the image, untimed),
 *   4. the merge: prune with --keep-last 1 (the full folded into the delta).
 * Configurations are interleaved within each round, their order rotated from
 * round to round. Throughput is disk bytes per second for steps 1–3 and changed
 * bytes per second for the merge; the ratio is plain's median time over the
 * encrypted configuration's (its throughput over plain's).
 * Key derivation uses scrypt at N = 1024 (VHDVAULT_TEST_SCRYPT_N), so that
 * opening a repository costs milliseconds instead of the calibrated half second.
 * Beside it, what bounds the figures: one thread sealing and opening 2 MiB
 * buffers with each cipher (the repository's aead.seal/open), and SHA-256
 * against HMAC-SHA256 (the plain and the keyed block digest) of 2 MiB buffers.
 * Goal (issue): every step of an encrypted repository at ≥ 0.9× plain's throughput.
 */
import { copyFile, mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { rmSync } from 'node:fs';
import { createHash, createHmac, randomBytes, randomFillSync } from 'node:crypto';
import { availableParallelism, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { type Cipher, open as openSealed, seal, sealPieces } from '../src/crypto/aead.js';
import { backup } from '../src/store/backup.js';
import { prune } from '../src/store/prune.js';
import { Repository, type LayoutName } from '../src/store/repository.js';
import { restore } from '../src/store/restore.js';
import { describeFilesystem, envInt, formatTable, median, MiB, rewriteSeededBlocks, sameContent, syncAll, timeIt, writeResults, writeSeededDisk } from './lib.js';
import { parseSize } from '../src/util/sizes.js';

const FORMAT = 'vhdvault-bench-crypto/1';
const GOAL = 0.9;
const BLOCK = 2 * MiB;
const DISK = 'disk';
const SCRYPT_N = '1024';
const ZERO_SHARE = 0.1;
const CHANGED_SHARE = 0.05;
const SEED = 1;
const PASSWORD = { env: { VHDVAULT_PASSWORD: 'bench-crypto' } };

const LAYOUTS = ['dir', 'objects'] as const satisfies readonly LayoutName[];
type Config = 'plain' | Cipher;
const CONFIGS: readonly Config[] = ['plain', 'aes-256-gcm', 'chacha20-poly1305'];
const STEPS = ['full backup', 'delta backup', 'restore', 'merge'] as const;
type Step = (typeof STEPS)[number];

const note = (line: string) => process.stderr.write(`crypto bench: ${line}\n`);
const round3 = (n: number) => Math.round(n * 1000) / 1000;
const round2 = (n: number) => Math.round(n * 100) / 100;
const round1 = (n: number) => Math.round(n * 10) / 10;

/** The CPU as /proc/cpuinfo names it, and whether it has AES-NI (the `aes` flag). */
async function cpuFacts(): Promise<{ cpuModel: string; aes: boolean | null }> {
  const text = await readFile('/proc/cpuinfo', 'utf8').catch(() => '');
  const field = (name: string) => new RegExp(`^${name}\\s*:\\s*(.*)$`, 'm').exec(text)?.[1]?.trim();
  const flags = field('flags');
  return { cpuModel: field('model name') ?? 'unknown', aes: flags === undefined ? null : flags.split(/\s+/).includes('aes') };
}

// ---------------------------------------------------------------- primitives

interface PrimitiveRow {
  operation: string;
  runsMiBps: number[];
  mibPerSecond: number;
  rangeMiBps: [number, number];
}

/** One thread: sealing and opening 2 MiB buffers per cipher, SHA-256 and HMAC-SHA256 of 2 MiB buffers; interleaved rounds. */
function primitives(rounds: number): PrimitiveRow[] {
  const buffers = Array.from({ length: 4 }, () => randomFillSync(Buffer.allocUnsafe(BLOCK)));
  const key = randomBytes(32);
  const ad = 'vhdvault/1\0bench\0dir-block\0disk\0' + '0';
  const perRun = 48; // 96 MiB per measurement
  const sealed = new Map<Cipher, Buffer[]>((['aes-256-gcm', 'chacha20-poly1305'] as const).map((c) => [c, buffers.map((b) => seal(c, key, b, ad))]));
  const ops: Array<[string, (i: number) => unknown]> = [
    // A block file is sealed as pieces written together (sealPieces); a whole put (a block object) as one buffer (seal).
    ['seal as pieces (block file), aes-256-gcm', (i) => sealPieces('aes-256-gcm', key, [buffers[i % 4]!], ad)],
    ['seal joined (block object), aes-256-gcm', (i) => seal('aes-256-gcm', key, buffers[i % 4]!, ad)],
    ['open, aes-256-gcm', (i) => openSealed(key, sealed.get('aes-256-gcm')![i % 4]!, ad)],
    ['seal as pieces (block file), chacha20-poly1305', (i) => sealPieces('chacha20-poly1305', key, [buffers[i % 4]!], ad)],
    ['seal joined (block object), chacha20-poly1305', (i) => seal('chacha20-poly1305', key, buffers[i % 4]!, ad)],
    ['open, chacha20-poly1305', (i) => openSealed(key, sealed.get('chacha20-poly1305')![i % 4]!, ad)],
    ['SHA-256 (plain block digest)', (i) => createHash('sha256').update(buffers[i % 4]!).digest()],
    ['HMAC-SHA256 (encrypted block digest)', (i) => createHmac('sha256', key).update(buffers[i % 4]!).digest()],
  ];
  for (const [, fn] of ops) for (let i = 0; i < 4; i++) fn(i); // warm-up
  const runs = new Map<string, number[]>(ops.map(([name]) => [name, []]));
  for (let r = 0; r < Math.max(3, rounds); r++) {
    for (const [name, fn] of ops) {
      const start = process.hrtime.bigint();
      for (let i = 0; i < perRun; i++) fn(i);
      const s = Number(process.hrtime.bigint() - start) / 1e9;
      runs.get(name)!.push((perRun * BLOCK) / MiB / s);
    }
  }
  return ops.map(([name]) => {
    const xs = runs.get(name)!;
    return { operation: name, runsMiBps: xs.map(round1), mibPerSecond: round1(median(xs)), rangeMiBps: [round1(Math.min(...xs)), round1(Math.max(...xs))] };
  });
}

// ---------------------------------------------------------------- the steps

interface StepRun {
  seconds: number;
}

/** One configuration's four steps on a new repository under `work`; the repository is removed afterwards. */
async function runConfig(work: string, n: number, layout: LayoutName, config: Config, base: string, changed: string, changedBlocks: number): Promise<Record<Step, StepRun>> {
  const root = join(work, `repo-${n}-${layout}-${config}`);
  const out = join(work, 'restored.raw');
  try {
    const repo = await Repository.init(root, { layout, compression: 'none', ...(config === 'plain' ? {} : { encryption: config, password: PASSWORD }) });
    await syncAll();
    const full = await timeIt(() => backup(repo, DISK, { source: base }));
    await syncAll();
    let written = -1;
    const delta = await timeIt(async () => (written = (await backup(repo, DISK, { source: changed })).blocksWritten));
    if (written !== changedBlocks) throw new Error(`${layout}/${config}: the delta stored ${written} blocks, expected ${changedBlocks}`);
    await syncAll();
    const restored = await timeIt(() => restore(repo, DISK, out, { format: 'raw' }));
    if (!(await sameContent(changed, out))) throw new Error(`${layout}/${config}: the restore differs from the source`);
    await rm(out, { force: true });
    await syncAll();
    let merged = -1;
    const merge = await timeIt(async () => (merged = (await prune(repo, DISK, { policy: { last: 1 } })).merged));
    const left = await repo.backups(DISK);
    if (merged !== 1 || left.length !== 1) throw new Error(`${layout}/${config}: prune --keep-last 1 merged ${merged} and left ${left.length} backups, expected 1 and 1`);
    return { 'full backup': { seconds: full }, 'delta backup': { seconds: delta }, restore: { seconds: restored }, merge: { seconds: merge } };
  } finally {
    await rm(out, { force: true });
    await rm(root, { recursive: true, force: true });
  }
}

interface Row {
  layout: LayoutName;
  step: Step;
  config: Config;
  /** Bytes the throughput is counted over: the disk, or for the merge the changed blocks. */
  bytes: number;
  runsSeconds: number[];
  medianSeconds: number;
  rangeSeconds: [number, number];
  mibPerSecond: number;
  /** Plain's median time over this configuration's (null for plain). */
  ratioVsPlain: number | null;
  /** The same ratio round by round (each round's plain run against its own): the spread. */
  ratioRange: [number, number] | null;
  goal: number | null;
  meetsGoal: boolean | null;
}

async function main(): Promise<void> {
  const json = process.argv.includes('--json');
  const size = process.env.BENCH_SIZE ? parseSize(process.env.BENCH_SIZE) : envInt('BENCH_SIZE_MIB', 1024) * MiB;
  const rounds = envInt('BENCH_ROUNDS', 3);
  if (!Number.isInteger(size / BLOCK) || size / BLOCK < 20) throw new Error('BENCH_SIZE must be a multiple of 2 MiB and at least 40 MiB');
  if (!Number.isInteger(rounds) || rounds < 1) throw new Error('BENCH_ROUNDS must be a whole number ≥ 1');
  // Key files made by this process derive their key at N = 1024: opening costs milliseconds, not the calibrated half second.
  process.env.VHDVAULT_TEST_SCRYPT_N = SCRYPT_N;

  const base = process.env.BENCH_DIR ?? tmpdir();
  const work = await mkdtemp(join(base, 'vhdvault-bench-crypto-'));
  const cleanUp = () => rmSync(work, { recursive: true, force: true });
  const onSignal = (signal: NodeJS.Signals) => {
    cleanUp();
    process.kill(process.pid, signal);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  // The objects layout caches block maps: here, not in the user's cache.
  process.env.VHDVAULT_CACHE_DIR = join(work, 'cache');
  await mkdir(process.env.VHDVAULT_CACHE_DIR);
  const loadBefore = loadavg().map(round2);
  try {
    const filesystem = await describeFilesystem(work);
    const source = join(work, 'source.raw');
    const changed = join(work, 'changed.raw');
    note(`writing a seeded ${size / MiB} MiB disk and its rewritten copy in ${work} (${filesystem})`);
    const disk = await writeSeededDisk(source, size, { seed: SEED, zeroShare: ZERO_SHARE, blockSize: BLOCK });
    await copyFile(source, changed);
    const rewritten = await rewriteSeededBlocks(changed, disk, CHANGED_SHARE, SEED + 1);
    const changedBytes = rewritten.length * BLOCK;

    note('primitives: seal/open per cipher, SHA-256 and HMAC-SHA256, one thread');
    const prims = primitives(rounds);

    const runs = new Map<string, number[]>();
    const at = (layout: LayoutName, step: Step, config: Config) => `${layout}\0${step}\0${config}`;
    let n = 0;
    for (let round = 0; round < rounds; round++) {
      for (const layout of LAYOUTS) {
        // Rotated each round, so that no configuration always runs first (or right after another).
        const order = CONFIGS.map((_, i) => CONFIGS[(i + round) % CONFIGS.length]!);
        for (const config of order) {
          note(`round ${round + 1}/${rounds}, ${layout} layout, ${config}`);
          const result = await runConfig(work, n++, layout, config, source, changed, rewritten.length);
          for (const step of STEPS) {
            const key = at(layout, step, config);
            runs.set(key, [...(runs.get(key) ?? []), result[step].seconds]);
          }
        }
      }
    }

    const rows: Row[] = [];
    for (const layout of LAYOUTS) {
      for (const step of STEPS) {
        const plain = runs.get(at(layout, step, 'plain'))!;
        for (const config of CONFIGS) {
          const xs = runs.get(at(layout, step, config))!;
          const bytes = step === 'merge' ? changedBytes : size;
          const med = median(xs);
          const ratio = config === 'plain' ? null : median(plain) / med;
          const perRound = xs.map((s, i) => plain[i]! / s);
          rows.push({
            layout,
            step,
            config,
            bytes,
            runsSeconds: xs.map(round3),
            medianSeconds: round3(med),
            rangeSeconds: [round3(Math.min(...xs)), round3(Math.max(...xs))],
            mibPerSecond: round1(bytes / MiB / med),
            ratioVsPlain: ratio === null ? null : round2(ratio),
            ratioRange: ratio === null ? null : [round2(Math.min(...perRound)), round2(Math.max(...perRound))],
            goal: config === 'plain' ? null : GOAL,
            meetsGoal: ratio === null ? null : ratio >= GOAL,
          });
        }
      }
    }

    const cpu = await cpuFacts();
    const loadAfter = loadavg().map(round2);
    const params = {
      sizeMiB: size / MiB,
      rounds,
      layouts: [...LAYOUTS],
      compression: 'none',
      configs: [...CONFIGS],
      zeroBlocks: disk.zeroBlocks.length,
      changedBlocks: rewritten.length,
      seed: SEED,
      scryptN: Number(SCRYPT_N),
      filesystem,
      concurrency: `default (${availableParallelism()} workers)`,
    };
    const results = { rows, primitives: prims };
    const met = rows.filter((r) => r.meetsGoal !== null);
    const notes = [
      `Taken with scrypt at N = ${SCRYPT_N} (VHDVAULT_TEST_SCRYPT_N) so that key derivation does not weigh on the steps; a real repository's key file costs about half a second to open, once per command.`,
      `Load average ${loadBefore.join(', ')} before and ${loadAfter.join(', ')} after: other work shared the ${availableParallelism()} CPUs.`,
      `Goal met in ${met.filter((r) => r.meetsGoal).length} of ${met.length} encrypted steps.`,
    ];
    await writeResults('crypto', params, results, { format: FORMAT, machine: { cores: availableParallelism(), cpuModel: cpu.cpuModel, aes: cpu.aes, loadAverage: { before: loadBefore, after: loadAfter } }, notes });
    if (json) return console.log(JSON.stringify({ format: FORMAT, machine: { cores: availableParallelism(), ...cpu }, params, ...results }, null, 2));

    console.log(
      `${size / MiB} MiB seeded disk (${disk.zeroBlocks.length} of ${size / BLOCK} blocks zero; the delta rewrites ${rewritten.length} blocks, ${changedBytes / MiB} MiB), compression none, local folder on ${filesystem}, ${rounds} round${rounds > 1 ? 's' : ''} (median, min–max), in-process API`,
    );
    console.log(`${availableParallelism()} cores, ${cpu.cpuModel}, AES-NI ${cpu.aes ? 'yes' : cpu.aes === false ? 'no' : 'unknown'}; scrypt at N = ${SCRYPT_N} (VHDVAULT_TEST_SCRYPT_N) so that key derivation does not dominate; load average ${loadBefore.join(' ')} → ${loadAfter.join(' ')}`);
    console.log('');
    console.log(
      formatTable(
        ['layout', 'step', 'configuration', 'median s', 'min–max s', 'MiB/s', 'vs plain', 'rounds', 'goal'],
        rows.map((r) => [
          r.layout,
          r.step,
          r.config,
          r.medianSeconds.toFixed(3),
          `${r.rangeSeconds[0].toFixed(3)}–${r.rangeSeconds[1].toFixed(3)}`,
          r.mibPerSecond.toFixed(0),
          r.ratioVsPlain === null ? '—' : r.ratioVsPlain.toFixed(2),
          r.ratioRange === null ? '—' : `${r.ratioRange[0].toFixed(2)}–${r.ratioRange[1].toFixed(2)}`,
          r.goal === null ? '—' : `≥ ${r.goal} ${r.meetsGoal ? 'met' : 'NOT met'}`,
        ]),
      ),
    );
    console.log('(merge: MiB/s of the changed blocks merged; the other steps: of the disk)');
    console.log('');
    console.log('one thread, 2 MiB buffers:');
    console.log(formatTable(['primitive', 'MiB/s', 'min–max'], prims.map((p) => [p.operation, p.mibPerSecond.toFixed(0), `${p.rangeMiBps[0].toFixed(0)}–${p.rangeMiBps[1].toFixed(0)}`])));
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await rm(work, { recursive: true, force: true });
  }
}

await main();
