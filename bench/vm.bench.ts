/**
 * Whole-VM backups of a real two-disk Linux guest (src/demo/guest.ts:
 * the cloud kernel, busybox and qemu-ga under qemu-system-x86_64, KVM when
 * /dev/kvm is usable, else TCG), whose writer puts a counter on both disks
 * and then syncs, every 50 ms, timing each round (vhdvault.latency=1).
 *
 *   npm run bench:vm              # table
 *   npm run bench:vm -- --json    # one JSON object
 *
 * Environment: BENCH_DISK_MIB (default 64), BENCH_DATA_MIB of random data
 * put into each disk's ext4 before boot (default 24), BENCH_DELTAS (default
 * 9), BENCH_PAUSED runs of `--no-quiesce` (default 5), BENCH_IDLE_SECONDS
 * (default 10), BENCH_DIR (where to work).
 *
 * Sequence, once the guest is up: (a) idle: the writer's rounds with no
 * backup; (b) a full backup, then BENCH_DELTAS deltas, each both ways on the
 * same guest: `vm backup --qemu --qga --fleecing --json` into one repository,
 * and each disk on its own, one after the other, with
 * `backup --qemu --device --node --qga --fleecing --json` into another (the
 * order of the two alternates from round to round; a second between
 * commands); (c) `vm backup --no-quiesce` (the VM paused for the instant)
 * BENCH_PAUSED times; (d) the guest agent's freeze and thaw alone, 10
 * times, through the agent's socket (what any frozen window costs before a
 * point in time is set in it); (e) idle again, as a measure of noise.
 *
 * Figures: freeze-to-thaw (`frozenMs` of the VM backups' reports; goal:
 * median ≤ 100 ms) beside the disk-by-disk backups' (one disk's point in
 * time in the window) and the bare freeze and thaw of (d), and the pause of
 * the --no-quiesce runs (`pausedMs`); the wall time of the VM backup
 * against the sum of the disk-by-disk commands' (goal: ≤ 0.6× with two
 * disks), full and delta apart, beside what the reports say of the time
 * inside the processes; and the writer's round latency as the guest's clock
 * measured it (the shell's $EPOCHREALTIME, microseconds; busybox's date has
 * no %N), idle against
 * while each kind of backup command ran. A round belongs to the command
 * during whose run its line reached the host's console reader (polled every
 * 10 ms): a round the freeze held ends, and is printed, once the guest is
 * thawed, while the command still runs.
 */
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { GuestAgent } from '../src/qmp/GuestAgent.js';
import { bootGuest, type Guest, guestMissing, makeExt4Disk, stopGuests, type WriterRound, writerRounds } from '../src/demo/guest.js';
import { formatTable, median, MiB, mustRun, runCommand, writeRandomFile, writeResults } from './lib.js';

const CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));
const VM = 'web';
const FROZEN_GOAL_MS = 100;
const RATIO_GOAL = 0.6;

const t0 = performance.now();
const now = () => performance.now() - t0;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface DiskReport {
  kind: 'full' | 'delta';
  bytesRead: number;
  durationMs: number;
}

interface VmReport {
  id: string;
  disks: Record<string, DiskReport>;
  quiesced: boolean;
  frozenMs: number | null;
  pausedMs: number | null;
  durationMs: number;
}

interface LiveReport extends DiskReport {
  quiesced: boolean;
  frozenMs: number | null;
}

/** One command's run: its report, its wall time, and when it ran (ms since the bench started). */
interface Timed<T> {
  report: T;
  startMs: number;
  endMs: number;
  wallMs: number;
}

async function timed<T>(args: string[]): Promise<Timed<T>> {
  const startMs = now();
  const r = await runCommand(process.execPath, [CLI, ...args]);
  const endMs = now();
  if (r.code !== 0) throw new Error(`vhdvault ${args.join(' ')} exited ${r.code}: ${r.stderr.trim()}`);
  return { report: JSON.parse(r.stdout) as T, startMs, endMs, wallMs: endMs - startMs };
}

/** The writer's rounds, each stamped with when its line reached the host (polling the console text every 10 ms). */
function watchRounds(guest: Guest): { rounds: Array<WriterRound & { atMs: number }>; stop(): void } {
  const rounds: Array<WriterRound & { atMs: number }> = [];
  let offset = 0;
  const poll = () => {
    const text = guest.console();
    const end = text.lastIndexOf('\n') + 1;
    if (end <= offset) return;
    const atMs = now();
    for (const r of writerRounds(text.slice(offset, end))) rounds.push({ ...r, atMs });
    offset = end;
  };
  const timer = setInterval(poll, 10);
  return {
    rounds,
    stop: () => {
      clearInterval(timer);
      poll();
    },
  };
}

/**
 * The guest agent's freeze and thaw alone, `n` times (half a second apart)
 * on one connection: what every frozen window costs before vhdvault sets any
 * point in time in it.
 */
async function freezeThaw(qga: string, n: number): Promise<Array<{ freezeMs: number; thawMs: number }>> {
  const agent = await GuestAgent.connect(qga);
  try {
    const out: Array<{ freezeMs: number; thawMs: number }> = [];
    for (let i = 0; i < n; i++) {
      const a = performance.now();
      let b = a;
      try {
        await agent.execute('guest-fsfreeze-freeze');
        b = performance.now();
      } finally {
        await agent.execute('guest-fsfreeze-thaw');
      }
      out.push({ freezeMs: b - a, thawMs: performance.now() - b });
      await sleep(500);
    }
    return out;
  } finally {
    agent.close();
  }
}

/** Nearest-rank percentile. */
function percentile(xs: readonly number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.max(0, Math.ceil(p * s.length) - 1)]!;
}

const round1 = (x: number) => Math.round(x * 10) / 10;

interface LatencyRow {
  state: string;
  rounds: number;
  p50Ms: number | null;
  p99Ms: number | null;
  maxMs: number | null;
  p99VsIdle: number | null;
}

async function main(): Promise<void> {
  const json = process.argv.includes('--json');
  const log = (s: string) => {
    if (!json) console.error(s);
  };
  if (guestMissing !== undefined) throw new Error(`bench:vm: ${guestMissing}`);
  const diskMiB = Number(process.env.BENCH_DISK_MIB ?? 64);
  const dataMiB = Number(process.env.BENCH_DATA_MIB ?? 24);
  const deltas = Number(process.env.BENCH_DELTAS ?? 9);
  const pausedRuns = Number(process.env.BENCH_PAUSED ?? 5);
  const idleSeconds = Number(process.env.BENCH_IDLE_SECONDS ?? 10);
  const loadBefore = loadavg().map((l) => Number(l.toFixed(2)));

  // Short: Unix socket paths must fit in 108 bytes.
  const work = await mkdtemp(join(process.env.BENCH_DIR ?? tmpdir(), 'vv-vm-'));
  const fleecing = join(work, 'fleece');
  const repoVm = join(work, 'repo-vm');
  const repoDisks = join(work, 'repo-disks');
  let watcher: ReturnType<typeof watchRounds> | undefined;
  try {
    await mkdir(fleecing);
    // One disk qcow2, one raw (as the VM backup tests have them), each ext4 holding a file of random data.
    const images = [join(work, 'vda.qcow2'), join(work, 'vdb.raw')];
    for (const image of images) {
      const from = `${image}.files`;
      await mkdir(from);
      await writeRandomFile(join(from, 'data.bin'), dataMiB * MiB);
      await makeExt4Disk(image, diskMiB, undefined, { from });
      await rm(from, { recursive: true, force: true });
    }
    for (const repo of [repoVm, repoDisks]) await mustRun(process.execPath, [CLI, 'init', repo, '--layout', 'dir', '--compression', 'none']);
    const qemuVersion = (await mustRun('qemu-system-x86_64', ['--version'])).stdout.split('\n')[0]!.trim();
    // What every command pays before it does anything: Node and the CLI's modules.
    const starts: number[] = [];
    for (let i = 0; i < 3; i++) {
      const start = now();
      await mustRun(process.execPath, [CLI, '--version']);
      starts.push(now() - start);
    }
    const cliStartMs = median(starts);

    log(`boot the guest (${images.length} disks of ${diskMiB} MiB, ${dataMiB} MiB of data each)`);
    const guest = await bootGuest({ disks: images, writer: true, latency: true });
    log(`guest up in ${(guest.bootMs / 1000).toFixed(1)} s (${guest.accel})`);
    watcher = watchRounds(guest);
    await sleep(2000);

    const windows: Array<{ state: string; startMs: number; endMs: number }> = [];
    const idle = async (state: string) => {
      log(`${state}: ${idleSeconds} s`);
      const startMs = now();
      await sleep(idleSeconds * 1000);
      windows.push({ state, startMs, endMs: now() });
    };
    const vmBackup = async (state: string, ...extra: string[]) => {
      const r = await timed<VmReport>(['vm', 'backup', repoVm, VM, '--qemu', guest.qmpSocket, '--fleecing', fleecing, '--json', ...extra]);
      windows.push({ state, startMs: r.startMs, endMs: r.endMs });
      return r;
    };
    const diskByDisk = async () => {
      const runs: Array<Timed<LiveReport>> = [];
      for (const d of guest.disks) {
        const r = await timed<LiveReport>(['backup', repoDisks, `${VM}.${d.device}`, '--qemu', guest.qmpSocket, '--device', d.device, '--node', d.node, '--fleecing', fleecing, '--qga', guest.qgaSocket, '--json']);
        windows.push({ state: 'disks', startMs: r.startMs, endMs: r.endMs });
        runs.push(r);
        await sleep(1000);
      }
      return runs;
    };

    await idle('idle');

    // Full, then deltas: both ways each round, the order alternating.
    const quiesced: Array<Timed<VmReport>> = [];
    const byDisk: Array<Array<Timed<LiveReport>>> = [];
    for (let i = 0; i <= deltas; i++) {
      const kind = i === 0 ? 'full' : `delta ${i}`;
      const vmFirst = i % 2 === 0;
      if (!vmFirst) {
        log(`${kind}: disk by disk`);
        byDisk.push(await diskByDisk());
      }
      log(`${kind}: vm backup`);
      quiesced.push(await vmBackup('vm', '--qga', guest.qgaSocket));
      await sleep(1000);
      if (vmFirst) {
        log(`${kind}: disk by disk`);
        byDisk.push(await diskByDisk());
      }
    }
    const paused: Array<Timed<VmReport>> = [];
    for (let i = 0; i < pausedRuns; i++) {
      log(`vm backup --no-quiesce ${i + 1}/${pausedRuns}`);
      paused.push(await vmBackup('paused', '--no-quiesce'));
      await sleep(1000);
    }
    log('the agent\'s freeze and thaw alone, 10 times');
    const bareStart = now();
    const bare = await freezeThaw(guest.qgaSocket, 10);
    windows.push({ state: 'freezeOnly', startMs: bareStart, endMs: now() });
    await idle('idleAfter');
    watcher.stop();
    const loadAfter = loadavg().map((l) => Number(l.toFixed(2)));

    // What each run was: the VM backups' disks full then deltas, every one quiesced (or paused) as asked.
    const problems: string[] = [];
    quiesced.forEach((r, i) => {
      const want = i === 0 ? 'full' : 'delta';
      for (const [t, d] of Object.entries(r.report.disks)) if (d.kind !== want) problems.push(`vm backup ${i}: ${t} was ${d.kind}, not ${want}`);
      if (!r.report.quiesced) problems.push(`vm backup ${i} was not quiesced`);
    });
    byDisk.forEach((runs, i) => {
      const want = i === 0 ? 'full' : 'delta';
      for (const r of runs) {
        if (r.report.kind !== want) problems.push(`disk-by-disk round ${i}: a ${r.report.kind}, not ${want}`);
        if (!r.report.quiesced) problems.push(`disk-by-disk round ${i}: not quiesced`);
      }
    });
    for (const [i, r] of paused.entries()) if (r.report.pausedMs === null) problems.push(`--no-quiesce run ${i}: no pause reported`);

    // (1) Freeze to thaw, and the pause.
    const frozen = quiesced.map((r) => r.report.frozenMs).filter((x): x is number => x !== null);
    const frozenMedian = frozen.length ? median(frozen) : null;
    const pausedMs = paused.map((r) => r.report.pausedMs).filter((x): x is number => x !== null);
    const diskFrozen = byDisk.flat().map((r) => r.report.frozenMs).filter((x): x is number => x !== null);
    const freeze = {
      runs: quiesced.map((r, i) => ({ kind: i === 0 ? 'full' : 'delta', frozenMs: r.report.frozenMs, wallMs: Math.round(r.wallMs), durationMs: r.report.durationMs })),
      frozenMedianMs: frozenMedian,
      frozenMaxMs: frozen.length ? Math.max(...frozen) : null,
      goalMs: FROZEN_GOAL_MS,
      meetsGoal: frozenMedian !== null && frozenMedian <= FROZEN_GOAL_MS,
      pausedRuns: paused.map((r) => ({ pausedMs: r.report.pausedMs, wallMs: Math.round(r.wallMs) })),
      pausedMedianMs: pausedMs.length ? median(pausedMs) : null,
      pausedMaxMs: pausedMs.length ? Math.max(...pausedMs) : null,
      // What the frozen window is made of: the agent's freeze and thaw alone, and with one disk's point in time set inside (the disks one by one).
      diskFrozenRuns: diskFrozen.length,
      diskFrozenMedianMs: median(diskFrozen),
      diskFrozenMaxMs: Math.max(...diskFrozen),
      freezeThawRuns: bare.length,
      freezeThawMedianMs: round1(median(bare.map((b) => b.freezeMs + b.thawMs))),
      freezeThawMaxMs: round1(Math.max(...bare.map((b) => b.freezeMs + b.thawMs))),
      freezeMedianMs: round1(median(bare.map((b) => b.freezeMs))),
      thawMedianMs: round1(median(bare.map((b) => b.thawMs))),
    };

    // (3) The VM backup against its disks one by one: wall time of the commands, full and delta apart.
    const sumWall = (runs: Array<Timed<LiveReport>>) => runs.reduce((s, r) => s + r.wallMs, 0);
    const compare = (kind: string, vms: Array<Timed<VmReport>>, disks: Array<Array<Timed<LiveReport>>>) => {
      const vmMs = median(vms.map((r) => r.wallMs));
      const disksMs = median(disks.map(sumWall));
      const ratio = vmMs / disksMs;
      const bytesRead = median(vms.map((r) => Object.values(r.report.disks).reduce((s, d) => s + d.bytesRead, 0)));
      // Inside the processes: the VM backup's own duration and its slowest disk's read and commit (the disks are read at once); each disk's read and commit one by one.
      const vmInProcessMs = median(vms.map((r) => r.report.durationMs));
      const vmReadMs = median(vms.map((r) => Math.max(...Object.values(r.report.disks).map((d) => d.durationMs))));
      const disksReadMs = median(disks.map((runs) => runs.reduce((s, r) => s + r.report.durationMs, 0)));
      return {
        kind,
        runs: vms.length,
        vmWallMs: Math.round(vmMs),
        disksWallMs: Math.round(disksMs),
        ratio: Number(ratio.toFixed(3)),
        goal: RATIO_GOAL,
        meetsGoal: ratio <= RATIO_GOAL,
        bytesReadMiB: round1(bytesRead / MiB),
        vmInProcessMs: Math.round(vmInProcessMs),
        vmReadMs: Math.round(vmReadMs),
        disksReadMs: Math.round(disksReadMs),
      };
    };
    const wholeVsDisks = [compare('full', quiesced.slice(0, 1), byDisk.slice(0, 1)), compare('delta', quiesced.slice(1), byDisk.slice(1))];

    // (2) The writer's round latency, by what ran when its line arrived.
    const stateOf = (atMs: number) => windows.find((w) => atMs >= w.startMs && atMs <= w.endMs)?.state;
    const latencies = new Map<string, number[]>();
    for (const r of watcher.rounds) {
      const state = stateOf(r.atMs);
      if (state !== undefined) latencies.set(state, [...(latencies.get(state) ?? []), (r.endUs - r.startUs) / 1000]);
    }
    const idleP99 = percentile(latencies.get('idle') ?? [NaN], 0.99);
    const LABELS: Array<[string, string]> = [
      ['idle', 'idle'],
      ['vm', 'vm backup (guest frozen)'],
      ['paused', 'vm backup --no-quiesce (VM paused)'],
      ['disks', 'disk by disk (each frozen)'],
      ['freezeOnly', "the agent's freeze and thaw alone, no backup"],
      ['idleAfter', 'idle after (noise)'],
    ];
    const latency: LatencyRow[] = LABELS.map(([key, state]) => {
      const xs = latencies.get(key) ?? [];
      const p99 = xs.length ? percentile(xs, 0.99) : null;
      return {
        state,
        rounds: xs.length,
        p50Ms: xs.length ? round1(percentile(xs, 0.5)) : null,
        p99Ms: p99 === null ? null : round1(p99),
        maxMs: xs.length ? round1(Math.max(...xs)) : null,
        p99VsIdle: p99 === null || key === 'idle' ? null : Number((p99 / idleP99).toFixed(2)),
      };
    });

    const result = {
      accel: guest.accel,
      qemu: qemuVersion,
      guestCpus: 1,
      bootMs: guest.bootMs,
      diskMiB,
      dataMiB,
      formats: guest.disks.map((d) => `${d.device} ${d.format}`),
      cliStartMs: Math.round(cliStartMs),
      machine: { cores: cpus().length, loadavgBefore: loadBefore, loadavgAfter: loadAfter },
      freeze,
      wholeVsDisks,
      latency,
      problems,
      goals: [`median freeze-to-thaw ≤ ${FROZEN_GOAL_MS} ms`, `vm backup ≤ ${RATIO_GOAL}× the disks one by one (two disks)`],
    };
    const notes = [
      `Guest: ${guest.accel.toUpperCase()} (${qemuVersion}), 1 vCPU, on ${cpus().length} host cores shared with other work (load ${loadBefore.join(' ')} before, ${loadAfter.join(' ')} after).`,
      `Each command's wall time includes starting Node and the CLI, about ${Math.round(cliStartMs)} ms (\`vhdvault --version\`): once for the VM backup, once per disk one by one.`,
      ...problems.map((p) => `Problem: ${p}.`),
    ];
    await writeResults('vm', { diskMiB, dataMiBPerDisk: dataMiB, disks: guest.disks.length, deltas, pausedRuns, idleSeconds }, result, { notes });
    await guest.kill();
    if (json) {
      console.log(JSON.stringify(result, null, 2));
      return;
    }
    console.log(`whole-VM backups of a ${guest.disks.length}-disk guest (${guest.accel}, ${qemuVersion}), ${diskMiB} MiB disks with ${dataMiB} MiB of data each; ${cpus().length} cores, load ${loadBefore.join(' ')} → ${loadAfter.join(' ')}`);
    console.log(
      `freeze to thaw over ${frozen.length} vm backups: median ${frozenMedian} ms, max ${freeze.frozenMaxMs} ms — goal ≤ ${FROZEN_GOAL_MS} ms ${freeze.meetsGoal ? 'met' : 'not met'}; --no-quiesce pause: median ${freeze.pausedMedianMs} ms, max ${freeze.pausedMaxMs} ms`,
    );
    console.log(
      `frozen window: vm backup (2 disks' points) ${frozenMedian} ms, one disk's ${freeze.diskFrozenMedianMs} ms, the agent's freeze and thaw alone ${freeze.freezeThawMedianMs} ms (freeze ${freeze.freezeMedianMs}, thaw ${freeze.thawMedianMs})`,
    );
    for (const r of wholeVsDisks) console.log(`${r.kind}: vm backup ${r.vmInProcessMs} ms in its process, its slowest disk's read and commit ${r.vmReadMs} ms; the disks' reads and commits one by one ${r.disksReadMs} ms`);
    console.log(
      formatTable(
        ['backup', 'runs', 'vm backup', 'disk by disk', 'ratio', 'goal', 'read (MiB)'],
        wholeVsDisks.map((r) => [r.kind, String(r.runs), `${r.vmWallMs} ms`, `${r.disksWallMs} ms`, r.ratio.toFixed(2), `≤ ${RATIO_GOAL} ${r.meetsGoal ? 'met' : 'not met'}`, String(r.bytesReadMiB)]),
      ),
    );
    console.log(
      formatTable(
        ['writer rounds while', 'rounds', 'p50 (ms)', 'p99 (ms)', 'max (ms)', 'p99 vs idle'],
        latency.map((r) => [r.state, String(r.rounds), String(r.p50Ms ?? '—'), String(r.p99Ms ?? '—'), String(r.maxMs ?? '—'), r.p99VsIdle === null ? '—' : r.p99VsIdle.toFixed(2)]),
      ),
    );
    console.log(`CLI start-up: ${Math.round(cliStartMs)} ms per command`);
    for (const p of problems) console.log(`problem: ${p}`);
  } finally {
    watcher?.stop();
    await stopGuests();
    await rm(work, { recursive: true, force: true });
  }
}

await main();
