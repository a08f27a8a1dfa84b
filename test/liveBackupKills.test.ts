// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
/**
 * Live backups (both modes) killed with SIGKILL at random moments while a
 * guest keeps writing, and a qcow2 guest stopped uncleanly. Through the built
 * CLI, against qemu-storage-daemon as the guest (test/helpers/qsd.ts); the
 * test watches QEMU on the daemon's second monitor, since vhdvault holds the
 * first. The kill schedule comes from a seeded generator: the seed is logged,
 * and KILL_SEED=<n> replays a run.
 */
import { spawn } from 'node:child_process';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CLI, cliEnv, vhdvaultAsync } from './helpers/cli.js';
import { sha256, tempDir } from './helpers/files.js';
import { hasQsd, type Qsd, run, startQsd } from './helpers/qsd.js';
import { liveArgs as argsOf, liveReport, type LiveReport, vhdvaultLeftovers } from './helpers/live.js';
import { initRepo } from './helpers/store.js';
import { queryBlockExports } from '../src/qmp/commands.js';
import { QmpClient } from '../src/qmp/QmpClient.js';
import { Repository } from '../src/store/repository.js';
import { restore } from '../src/store/restore.js';

const MiB = 1024 * 1024;
const dir = await tempDir('vhdvault-livekill-');
const repo = join(dir, 'repo');
await initRepo(repo, 'dir');
/** Each disk's own fleecing folder: the two modes' kill tests run side by side. */
const fleecingOf = (disk: string) => join(dir, 'fleece', disk);
await run('mkdir', ['-p', ...['kills-fleecing', 'kills-direct', 'unclean'].map(fleecingOf)]);

const seed = Number(process.env.KILL_SEED ?? Date.now() % 2 ** 31);
console.log(`liveBackupKills: KILL_SEED=${seed}`);

/** mulberry32: small, seeded, good enough to spread kill moments. */
function prng(s: number): () => number {
  return () => {
    s = (s + 0x6d2b79f5) | 0;
    let t = Math.imul(s ^ (s >>> 15), 1 | s);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

interface Guest {
  qsd: Qsd;
  qmp: QmpClient;
}

const guests: Guest[] = [];
afterAll(() => Promise.all(guests.map((g) => g.qmp.close())));

async function startGuest(size: number, image?: string): Promise<Guest> {
  const qsd = await startQsd({ format: 'qcow2', size, image, secondMonitor: true });
  const g = { qsd, qmp: await QmpClient.connect(qsd.qmpSocket2!) };
  guests.push(g);
  return g;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** qemu-io commands through the guest's export; any failure is the guest seeing an error. */
async function guestIo(g: Guest, commands: string[]): Promise<void> {
  const { stdout, stderr } = await run('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), g.qsd.guestUri]);
  if (/fail|error/i.test(stdout + stderr)) throw new Error(`guest I/O failed (${commands.join('; ')}): ${stdout}${stderr}`);
}

/** The guest's disk as it is now, hashed. */
async function guestSha(g: Guest, name: string): Promise<string> {
  const out = join(dir, `${name}.expected.raw`);
  await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', g.qsd.guestUri, out]);
  const digest = await sha256(out);
  await run('rm', ['-f', out]);
  return digest;
}

/**
 * A guest that keeps writing 64 KiB of `pattern` at seeded offsets, a few
 * writes per qemu-io run, until stopped. pause() resolves once no write is in
 * flight; every error is kept and fails the test.
 */
class Writer {
  pattern = 1;
  writes = 0;
  errors: Error[] = [];
  private paused = false;
  private stopped = false;
  private idle: (() => void) | null = null;
  private wake: (() => void) | null = null;
  private readonly loop: Promise<void>;

  constructor(
    private readonly g: Guest,
    private readonly size: number,
    private readonly random: () => number,
  ) {
    this.loop = this.run();
  }

  private async run(): Promise<void> {
    while (!this.stopped) {
      if (this.paused) {
        this.idle?.();
        await new Promise<void>((r) => (this.wake = r));
        continue;
      }
      const commands = Array.from({ length: 4 }, () => `write -P ${this.pattern} ${Math.floor(this.random() * (this.size / 65536)) * 65536} 64k`);
      try {
        await guestIo(this.g, commands);
        this.writes += commands.length;
      } catch (err) {
        this.errors.push(err as Error);
      }
    }
    this.idle?.();
  }

  async pause(): Promise<void> {
    const idle = new Promise<void>((r) => (this.idle = r));
    this.paused = true;
    this.wake?.();
    await idle;
    this.idle = null;
  }

  resume(): void {
    this.paused = false;
    this.wake?.();
    this.wake = null;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.resume();
    await this.loop;
  }
}

type Mode = 'fleecing' | 'direct';
const liveArgs = (mode: Mode, g: Guest, disk: string, ...extra: string[]) => argsOf(g.qsd, repo, disk, mode === 'fleecing' ? fleecingOf(disk) : null, ...extra);


const parsed = liveReport;

const ours = (g: Guest) => vhdvaultLeftovers(g.qmp);

const ourExports = async (g: Guest) => (await queryBlockExports(g.qmp)).map((e) => e.id).filter((id) => id.startsWith('vhdvault-'));
/** An export of ours other than those in `before` (what a killed run left) exists. */
const hasExport = (g: Guest, before: string[] = []) => async () => (await ourExports(g)).some((id) => !before.includes(id));
const hasImage = (disk: string) => async () => (await readdir(fleecingOf(disk))).some((n) => n.startsWith('vhdvault-') && n.endsWith('.fleece.raw'));
/** Direct mode's copies file in the disk's folder. */
const copiesFiles = async (disk: string) => (await readdir(join(repo, 'disks', disk)).catch(() => [])).filter((n) => n.endsWith('.copies.tmp'));
const hasCopies = (disk: string) => async () => (await copiesFiles(disk)).length > 0;

/** Poll `cond` every 10 ms until it holds (true) or `done` settles first (false). */
async function until(cond: () => Promise<boolean>, done: { settled: boolean }): Promise<boolean> {
  for (;;) {
    if (done.settled) return false;
    if (await cond()) return true;
    await sleep(10);
  }
}

/**
 * A live backup whose point in time is known exactly: the writer pauses, the
 * guest is read, the backup starts, and the writer resumes once the export
 * exists (the filter went in before it) — or once the backup is over.
 */
async function knownBackup(mode: Mode, g: Guest, writer: Writer, disk: string, label: string): Promise<{ report: LiveReport; sha: string }> {
  await writer.pause();
  const sha = await guestSha(g, `${disk}-${label}`);
  // The export of a killed run may still be there: wait for the new one.
  const before = await ourExports(g);
  const state = { settled: false };
  const running = vhdvaultAsync(...liveArgs(mode, g, disk)).finally(() => (state.settled = true));
  await until(hasExport(g, before), state);
  writer.resume();
  const report = parsed(await running, label);
  return { report, sha };
}

/** A backup's content, restored in this process (a check: the code `vhdvault restore` runs, without a Node start-up). */
async function restoredSha(disk: string, id: string): Promise<string> {
  const out = join(dir, `${disk}-${id}.raw`);
  await restore(await Repository.open(repo), disk, out, { backup: id, format: 'raw' });
  const digest = await sha256(out);
  await run('rm', ['-f', out]);
  return digest;
}

/** `target`: the copy target exists (fleecing image, or direct mode's copies file); the filter goes in next. */
type KillAt = 'start' | 'qmp' | 'target' | 'export' | 'reading';

describe.skipIf(!hasQsd)('live backup killed at random moments', () => {
  // The two modes side by side (each its own guest, disk and fleecing folder): their rounds mostly wait, on
  // --max-read, QEMU and the kill moments.
  it.concurrent.each(['fleecing', 'direct'] as const)('%s mode: kill -9 at random moments while the guest writes: the guest never fails, the next backup cleans up and restores exactly', async (mode) => {
    const random = prng(seed);
    const size = 24 * MiB;
    const disk = `kills-${mode}`;
    const g = await startGuest(size);
    await guestIo(g, [`write -P 0xee 0 ${size}`]);
    const writer = new Writer(g, size, random);
    const expected = new Map<string, string>();
    const log: string[] = [];
    try {
      const first = await knownBackup(mode, g, writer, disk, 'first');
      expect(first.report).toMatchObject({ mode, kind: 'full', previousCheckpoint: null });
      expected.set(first.report.id, first.sha);
      let latest = first.report;

      const moments: KillAt[] = ['start', 'qmp', 'target', 'export', 'reading'];
      const rounds = 6;
      for (let round = 0; round < rounds; round++) {
        writer.pattern = 0x10 + round;
        const at = moments[round % moments.length]!; // every kind once, the first twice; the delays within them are random
        const delay = at === 'start' ? Math.floor(random() * 150) : at === 'qmp' ? 150 + Math.floor(random() * 400) : at === 'reading' ? 200 + Math.floor(random() * 1800) : Math.floor(random() * 30);
        const full = random() < 0.5;
        const t0 = performance.now();
        const line = `round ${round}: kill at ${at} +${delay} ms${full ? ' --full' : ''}`;
        log.push(line);
        // --full reads all 24 MiB at 4 MiB/s (6 s), far past any kill moment; a delta reads what the writer dirtied.
        const child = spawn(process.execPath, [CLI, ...liveArgs(mode, g, disk, '--max-read', '4M', ...(full ? ['--full'] : []))], { stdio: ['ignore', 'ignore', 'pipe'], env: cliEnv() });
        let stderr = '';
        child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
        const state = { settled: false };
        const exited = new Promise<{ code: number | null; signal: string | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal }))).finally(() => (state.settled = true));
        let reached = true;
        if (at === 'target') reached = await until(mode === 'fleecing' ? hasImage(disk) : hasCopies(disk), state);
        if (at === 'export' || at === 'reading') reached = await until(hasExport(g), state);
        await sleep(delay);
        child.kill('SIGKILL');
        const end = await exited;
        // A run that ended by itself before its kill (a short delta) must have succeeded; it is then a backup of unknown content.
        expect(end.signal === 'SIGKILL' || end.code === 0, `${line} (seed ${seed}): exit ${end.code}: ${stderr}`).toBe(true);
        expect(reached || end.signal !== 'SIGKILL', `${line}: killed before its moment`).toBe(true);
        if (end.signal !== 'SIGKILL') log.push(`round ${round}: finished (exit 0) before the kill`);

        const next = await knownBackup(mode, g, writer, disk, `round${round}`);
        log.push(`round ${round}: ${Math.round(performance.now() - t0)} ms; ${next.report.kind} read ${next.report.bytesRead} from ${next.report.previousCheckpoint ?? 'nothing'}${next.report.note ? ` (${next.report.note})` : ''}`);
        expected.set(next.report.id, next.sha);
        latest = next.report;
        const left = await ours(g);
        expect(left, `${line} (seed ${seed})`).toEqual({ nodes: [], exports: [], bitmaps: [{ name: latest.checkpoint, recording: true, inconsistent: false }] });
        expect(await readdir(fleecingOf(disk)), line).toEqual([]);
        expect(await copiesFiles(disk), line).toEqual([]);
        expect(writer.errors, line).toEqual([]);
      }
    } finally {
      await writer.stop();
      console.log(`liveBackupKills, ${mode} mode (seed ${seed}):\n  ${log.join('\n  ')}\n  guest writes: ${writer.writes}`);
    }
    expect(writer.errors).toEqual([]);
    expect(writer.writes).toBeGreaterThan(0);
    for (const [id, sha] of expected) expect(await restoredSha(disk, id), `backup ${id} (seed ${seed})`).toBe(sha);
    const v = await vhdvaultAsync('verify', repo, disk);
    expect(v.code, v.stdout + v.stderr).toBe(0);
  });

  it('falls back to reading everything after an unclean stop of a qcow2 guest: the persistent bitmap comes back inconsistent', async () => {
    const size = 16 * MiB;
    const disk = 'unclean';
    let g = await startGuest(size);
    await guestIo(g, [`write -P 0x21 0 ${size}`]);
    const first = parsed(await vhdvaultAsync(...liveArgs('fleecing', g, disk)));
    expect(first).toMatchObject({ kind: 'full', previousCheckpoint: null });
    const firstSha = await guestSha(g, 'unclean-first');
    // A clean stop stores the bitmap in the image.
    await g.qmp.close();
    await g.qsd.stop();
    g = await startGuest(size, g.qsd.image);
    expect((await ours(g)).bitmaps).toEqual([{ name: first.checkpoint, recording: true, inconsistent: false }]);
    await guestIo(g, [`write -P 0x22 ${3 * MiB} 64k`]);
    // Opened read-write, the bitmap is marked in use in the image: an unclean stop leaves it so.
    await g.qmp.close();
    await g.qsd.kill();
    g = await startGuest(size, g.qsd.image);
    expect((await ours(g)).bitmaps).toEqual([{ name: first.checkpoint, recording: false, inconsistent: true }]);
    await guestIo(g, [`write -P 0x23 ${9 * MiB} 64k`]);
    const sha = await guestSha(g, 'unclean-second');
    const next = parsed(await vhdvaultAsync(...liveArgs('fleecing', g, disk)));
    expect(next).toMatchObject({ kind: 'delta', previousCheckpoint: null, bytesRead: size });
    expect(next.note).toContain(`previous checkpoint bitmap "${first.checkpoint}" is inconsistent`);
    expect(await ours(g)).toEqual({ nodes: [], exports: [], bitmaps: [{ name: next.checkpoint, recording: true, inconsistent: false }] });
    expect(await readdir(fleecingOf(disk))).toEqual([]);
    expect(await restoredSha(disk, next.id)).toBe(sha);
    expect(await restoredSha(disk, first.id)).toBe(firstSha);
    // And the new checkpoint is trusted again.
    await guestIo(g, [`write -P 0x24 0 64k`]);
    const third = parsed(await vhdvaultAsync(...liveArgs('fleecing', g, disk)));
    expect(third).toMatchObject({ kind: 'delta', previousCheckpoint: next.checkpoint, bytesRead: 2 * MiB });
    expect(third.note).toBeUndefined();
    expect(await restoredSha(disk, third.id)).toBe(await guestSha(g, 'unclean-third'));
  });
});
