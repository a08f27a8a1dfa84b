// vitest: slow (a long file: started first on a fresh checkout, see vitest.config.ts)
/**
 * Live backups of a running disk in fleecing mode, through the built CLI,
 * against qemu-storage-daemon as the guest (test/helpers/qsd.ts): qemu-io
 * writes through the guest's NBD export while vhdvault backs it up. The test
 * watches QEMU on the daemon's second monitor, since vhdvault holds the first.
 */
import { mkdir, readdir, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it, onTestFinished, test } from 'vitest';
import { spawn, spawnSync } from 'node:child_process';
import { CLI, cliEnv, vhdvault, vhdvaultAsync } from './helpers/cli.js';
import { mountTmpfs, tempDir } from './helpers/files.js';
import { hasQsd, type Qsd, run, startQsd } from './helpers/qsd.js';
import { liveArgs as argsOf, liveReport, type LiveReport, vhdvaultLeftovers } from './helpers/live.js';
import { initRepo } from './helpers/store.js';
import { queryBlockExports } from '../src/qmp/commands.js';
import { QmpClient } from '../src/qmp/QmpClient.js';
import { NbdClient } from '../src/nbd/NbdClient.js';
import { ViewNames } from '../src/live/frozenView.js';
import { Repository } from '../src/store/repository.js';
import { restore } from '../src/store/restore.js';

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;
const dir = await tempDir('vhdvault-live-');
const repo = join(dir, 'repo');
await initRepo(repo, 'dir');
const fleecing = join(dir, 'fleece');
await run('mkdir', ['-p', fleecing]);

/** A guest: the daemon, our own monitor on it, and a model of its disk's bytes. */
interface Guest {
  qsd: Qsd;
  qmp: QmpClient;
  bytes: Buffer;
}

const guests: Guest[] = [];
afterAll(() => Promise.all(guests.map((g) => g.qmp.close())));

async function startGuest(format: 'qcow2' | 'raw', size: number, image?: string, bytes?: Buffer): Promise<Guest> {
  const qsd = await startQsd({ format, size, image, secondMonitor: true });
  const g = { qsd, qmp: await QmpClient.connect(qsd.qmpSocket2!), bytes: bytes ?? Buffer.alloc(size) };
  guests.push(g);
  return g;
}

/** A guest write through its export; must succeed whatever the backup does. */
async function write(g: Guest, pattern: number, offset: number, length: number): Promise<void> {
  await run('qemu-io', ['-f', 'raw', '-c', `write -P ${pattern} ${offset} ${length}`, g.qsd.guestUri]);
  g.bytes.fill(pattern, offset, offset + length);
}

type Mode = 'fleecing' | 'direct';
const liveArgs = (mode: Mode, g: Guest, disk: string, ...extra: string[]) => argsOf(g.qsd, repo, disk, mode === 'fleecing' ? fleecing : null, ...extra);

const parsed = liveReport;

async function liveBackup(mode: Mode, g: Guest, disk: string, ...extra: string[]): Promise<LiveReport> {
  return parsed(await vhdvaultAsync(...liveArgs(mode, g, disk, ...extra)));
}

/** The names a backup of the guest node g0, run by process `pid`, gives what it adds to QEMU. */
const viewOf = (pid: number) => new ViewNames('g0', pid);

/** Files in the disk's folder a live backup leaves while it runs: direct mode's copies. */
const copiesFiles = async (disk: string) => (await readdir(join(repo, 'disks', disk)).catch(() => [])).filter((n) => n.endsWith('.copies.tmp'));

/** A backup's content, restored in this process (a check: the code `vhdvault restore` runs, without a Node start-up). */
async function restored(disk: string, id: string): Promise<Buffer> {
  const out = join(dir, `${disk}-${id}.raw`);
  await restore(await Repository.open(repo), disk, out, { backup: id, format: 'raw' });
  const bytes = await readFile(out);
  await rm(out);
  return bytes;
}

/** Resolves once vhdvault's export exists: the point in time has passed. */
async function exportShown(g: Guest): Promise<void> {
  for (;;) {
    if ((await queryBlockExports(g.qmp)).some((e) => e.id.startsWith('vhdvault-'))) return;
    await new Promise((r) => setTimeout(r, 20));
  }
}

const ours = (g: Guest) => vhdvaultLeftovers(g.qmp);

/** Whether `block` can still be read from vhdvault's view of the guest (QEMU refuses what was discarded from it). */
async function viewReadable(g: Guest, block: number): Promise<boolean> {
  const id = (await queryBlockExports(g.qmp)).find((e) => e.id.startsWith('vhdvault-'))!.id;
  const view = await NbdClient.connect(`nbd+unix:///${id}?socket=${g.qsd.nbdSocket}`);
  try {
    return await view.read(block * BLOCK, 512).then(() => true, () => false);
  } finally {
    await view.disconnect().catch(() => undefined);
  }
}

/** Resolves once vhdvault has discarded `block` from its view. */
async function viewDiscarded(g: Guest, block: number): Promise<void> {
  while (await viewReadable(g, block)) await new Promise((r) => setTimeout(r, 20));
}

describe('backup --qemu usage', () => {
  it('refuses options that do not go together, with exit 2', async () => {
    const base = ['backup', repo, 'u', '--qemu', '/nonexistent.sock'];
    const cases: Array<[string[], RegExp]> = [
      [[...base, '--node', 'g0', '--fleecing-max', '1M'], /--fleecing-max needs --fleecing <dir>/],
      [[...base, '--node', 'g0', '--fleecing', fleecing, '--source', 'x.raw'], /--qemu and --source/],
      [[...base, '--fleecing', fleecing], /--qemu needs --node/],
      [[...base, '--node', 'disk0', '--device', '../vd0'], /invalid --device "..\/vd0"/],
      [['backup', repo, 'u', '--source', 'x.raw', '--fleecing', fleecing], /--fleecing needs --qemu/],
    ];
    for (const [args, message] of cases) {
      const r = vhdvault(...args);
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr).toMatch(message);
    }
  });
});

// The two modes side by side (their tests mostly wait on --max-read and QEMU), each mode's tests in turn;
// every disk has a fleecing folder of its own, so that one mode's images never show in the other's checks.
describe.skipIf(!hasQsd).concurrent.each(['fleecing', 'direct'] as const)('backup --qemu, %s mode', (mode) => {
  const folderOf = (disk: string) => join(dir, 'fleece-of', disk);
  const args = (g: Guest, disk: string, ...extra: string[]) => argsOf(g.qsd, repo, disk, mode === 'fleecing' ? folderOf(disk) : null, ...extra);
  const backUp = async (g: Guest, disk: string) => parsed(await vhdvaultAsync(...args(g, disk)));
  const it = test.sequential;

  it('backs up the disk as it was when the backup started, while the guest overwrites it', async () => {
    const g = await startGuest('qcow2', 8 * MiB);
    await write(g, 0xaa, 0, 8 * MiB);
    const a = Buffer.from(g.bytes);
    const disk = `consistent-${mode}`;
    await mkdir(folderOf(disk), { recursive: true });
    const running = vhdvaultAsync(...args(g, disk, '--max-read', '2M'));
    await exportShown(g);
    await write(g, 0xbb, 4 * MiB, 4 * MiB); // the last two blocks, read a second or more from now
    const report = parsed(await running);
    expect(report).toMatchObject({ mode, kind: 'full', previousCheckpoint: null, bytesRead: 8 * MiB });
    expect(report.copiedBytes).toBeGreaterThanOrEqual(4 * MiB); // the old data B overwrote
    // Each block discarded from the view once backed up (the image frees what was copied for it).
    expect(report.discardedBytes).toBe(8 * MiB);
    if (mode === 'fleecing') expect(report.fleecingPeakBytes).toBeGreaterThanOrEqual(4 * MiB);
    else expect(report).toMatchObject({ fleecingPeakBytes: null, copies: expect.any(Number) });
    expect((await restored(disk, report.id)).equals(a)).toBe(true);
    await run('qemu-io', ['-f', 'raw', '-r', '-c', `read -P 0xbb ${4 * MiB} ${4 * MiB}`, '-c', `read -P 0xaa 0 ${4 * MiB}`, g.qsd.guestUri]);
    expect(await ours(g)).toEqual({ nodes: [], exports: [], bitmaps: [{ name: report.checkpoint, recording: true, inconsistent: false }] });
    expect(await readdir(folderOf(disk))).toEqual([]);
    expect(await copiesFiles(disk)).toEqual([]);
  });

  it('reads only the blocks a checkpoint marks, five backups in a row, each restoring exactly', async () => {
    const g = await startGuest('qcow2', 32 * MiB);
    await write(g, 0x01, 0, 32 * MiB); // all allocated: every dirty block reads as 2 MiB of data
    const expected = new Map<string, Buffer>();
    const disk = `ckpt-${mode}`;
    await mkdir(folderOf(disk), { recursive: true });
    const first = await backUp(g, disk);
    expect(first).toMatchObject({ kind: 'full', previousCheckpoint: null, bytesRead: 32 * MiB });
    expect(first.note).toBeUndefined();
    expected.set(first.id, Buffer.from(g.bytes));
    let previous = first;
    // [pattern, offset, length] writes between backups, and the blocks they dirty.
    const rounds: Array<{ writes: Array<[number, number, number]>; blocks: number }> = [
      { writes: [[0x10, 64 * 1024, 64 * 1024]], blocks: 1 },
      { writes: [[0x20, 3 * BLOCK - 32 * 1024, 64 * 1024]], blocks: 2 }, // across a block boundary
      { writes: [[0x30, 0, 4096], [0x31, 15 * BLOCK, 4096], [0x32, 15 * BLOCK + 8192, 4096]], blocks: 2 },
      { writes: [[0x40, 8 * BLOCK, 3 * BLOCK]], blocks: 3 },
    ];
    for (const round of rounds) {
      for (const [pattern, offset, length] of round.writes) await write(g, pattern, offset, length);
      const r = await backUp(g, disk);
      expect(r).toMatchObject({ kind: 'delta', previousCheckpoint: previous.checkpoint, bytesRead: round.blocks * BLOCK });
      expect(r.note).toBeUndefined();
      expect((await ours(g)).bitmaps).toEqual([{ name: r.checkpoint, recording: true, inconsistent: false }]);
      expected.set(r.id, Buffer.from(g.bytes));
      previous = r;
    }
    for (const [id, bytes] of expected) expect((await restored(disk, id)).equals(bytes), id).toBe(true);
  });

  it('copies nothing for guest writes to blocks the delta does not read: they leave the view before any block is read', async () => {
    const g = await startGuest('qcow2', 8 * MiB);
    await write(g, 0x31, 0, 8 * MiB);
    const disk = `discard-${mode}`;
    await mkdir(folderOf(disk), { recursive: true });
    const first = await backUp(g, disk);
    await write(g, 0x32, 0, BLOCK); // the delta reads only the first block, slowly
    const at = Buffer.from(g.bytes);
    const running = vhdvaultAsync(...args(g, disk, '--max-read', '256K'));
    await exportShown(g);
    await viewDiscarded(g, 3);
    expect(await viewReadable(g, 0)).toBe(true); // still being read: the last block left the view first
    await write(g, 0x33, BLOCK, 3 * BLOCK);
    const report = parsed(await running);
    expect(report).toMatchObject({ kind: 'delta', previousCheckpoint: first.checkpoint, bytesRead: BLOCK, discardedBytes: 8 * MiB, copiedBytes: 0 });
    if (mode === 'fleecing') expect(report.fleecingPeakBytes).toBe(0);
    expect((await restored(disk, report.id)).equals(at)).toBe(true);
    const next = await backUp(g, disk); // the writes after the point in time are the next delta's
    expect(next).toMatchObject({ kind: 'delta', bytesRead: 3 * BLOCK });
    expect((await restored(disk, next.id)).equals(g.bytes)).toBe(true);
  });

  it('backs up a disk whose size is not a multiple of 64 KiB: its partial last block stays in the view, QEMU lives', async () => {
    const size = 4 * MiB + 3 * 512;
    const g = await startGuest('qcow2', size);
    await write(g, 0x41, 0, size);
    const disk = `odd-${mode}`;
    await mkdir(folderOf(disk), { recursive: true });
    const report = await backUp(g, disk);
    expect(report).toMatchObject({ kind: 'full', bytesRead: size, discardedBytes: 4 * MiB });
    expect((await restored(disk, report.id)).equals(g.bytes)).toBe(true);
    await write(g, 0x42, size - 512, 512); // the daemon still serves the guest
    expect((await backUp(g, disk)).kind).toBe('delta');
  });

  it('removes what a killed run left in QEMU, the fleecing folder and the repository, and trusts no bitmap it touched', async () => {
    const size = 16 * MiB;
    const g = await startGuest('qcow2', size);
    await write(g, 0x09, 0, size);
    const disk = `killed-${mode}`;
    await mkdir(folderOf(disk), { recursive: true });
    const first = await backUp(g, disk);
    const child = spawn(process.execPath, [CLI, ...args(g, disk, '--full', '--max-read', '2M')], { stdio: 'ignore', env: cliEnv() });
    const gone = new Promise((resolve) => child.once('exit', resolve));
    await exportShown(g);
    child.kill('SIGKILL');
    await gone;
    const left = await ours(g);
    const view = viewOf(child.pid!);
    expect(left.nodes.sort()).toEqual([view.cbw, view.snap, view.target].sort());
    expect(left.exports).toHaveLength(1);
    expect(left.bitmaps).toHaveLength(2);
    expect(await readdir(folderOf(disk))).toHaveLength(mode === 'fleecing' ? 1 : 0);
    expect(await copiesFiles(disk)).toHaveLength(mode === 'direct' ? 1 : 0);
    await write(g, 0x0a, 3 * MiB, MiB); // the guest goes on through the orphaned filter (direct mode: its target is gone)
    // A killed direct-mode run's socket folder: any live backup removes it, whatever its own mode.
    const staleSockets = join(tmpdir(), `vhdvault-direct-${child.pid}-left`);
    await mkdir(staleSockets, { recursive: true });
    const next = await backUp(g, disk);
    expect(await stat(staleSockets).catch(() => null)).toBeNull();
    // The previous checkpoint was disabled at the point in time: it missed writes since.
    expect(next).toMatchObject({ kind: 'delta', previousCheckpoint: null, bytesRead: size });
    expect(next.note).toContain(`previous checkpoint bitmap "${first.checkpoint}" is not recording`);
    expect(await ours(g)).toEqual({ nodes: [], exports: [], bitmaps: [{ name: next.checkpoint, recording: true, inconsistent: false }] });
    expect(await readdir(folderOf(disk))).toEqual([]);
    expect(await copiesFiles(disk)).toEqual([]);
    expect((await restored(disk, next.id)).equals(g.bytes)).toBe(true);
  });
});

describe.skipIf(!hasQsd)('backup --qemu', () => {
  const mode = 'fleecing';

  it('falls back to reading everything when the checkpoint is lost with a restart, and says why', async () => {
    const size = 16 * MiB;
    const g = await startGuest('raw', size);
    await write(g, 0x05, 0, size);
    const first = await liveBackup(mode, g, 'raw');
    await g.qmp.close();
    await g.qsd.stop();
    const again = await startGuest('raw', size, g.qsd.image, g.bytes);
    expect((await ours(again)).bitmaps).toEqual([]); // transient on a raw disk
    await write(again, 0x06, 5 * MiB, 64 * 1024);
    const r = await liveBackup(mode, again, 'raw');
    expect(r).toMatchObject({ kind: 'delta', previousCheckpoint: null, bytesRead: size });
    expect(r.note).toContain(`previous checkpoint bitmap "${first.checkpoint}" is missing`);
    expect((await restored('raw', r.id)).equals(again.bytes)).toBe(true);
  });

  it('keeps a checkpoint per repository: one disk backed up into two repositories alternately still takes deltas', async () => {
    const g = await startGuest('qcow2', 16 * MiB);
    await write(g, 0x61, 0, 16 * MiB);
    const other = join(dir, 'other-repo');
    await initRepo(other, 'dir');
    const a1 = await liveBackup(mode, g, 'two-repos');
    const b1 = liveReport(await vhdvaultAsync(...argsOf(g.qsd, other, 'two-repos', fleecing)));
    await write(g, 0x62, 0, 64 * 1024);
    const a2 = await liveBackup(mode, g, 'two-repos');
    expect(a2).toMatchObject({ kind: 'delta', previousCheckpoint: a1.checkpoint, bytesRead: BLOCK });
    const b2 = liveReport(await vhdvaultAsync(...argsOf(g.qsd, other, 'two-repos', fleecing)));
    expect(b2).toMatchObject({ kind: 'delta', previousCheckpoint: b1.checkpoint, bytesRead: BLOCK });
    expect((await ours(g)).bitmaps.map((b) => b.name).sort()).toEqual([a2.checkpoint, b2.checkpoint].sort());
  });

  it('takes a relative --fleecing folder from where vhdvault runs, not from QEMU\'s working directory', async () => {
    const g = await startGuest('qcow2', 8 * MiB);
    await write(g, 0x63, 0, 8 * MiB);
    const r = spawnSync(process.execPath, [CLI, ...argsOf(g.qsd, repo, 'relative', 'fleece')], { cwd: dir, env: cliEnv(), encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(await readdir(fleecing)).toEqual([]);
  });

  it('fails the backup, not the guest, when the fleecing image grows past --fleecing-max, and leaves nothing behind', async () => {
    const size = 16 * MiB;
    const g = await startGuest('qcow2', size);
    await write(g, 0x07, 0, size);
    const first = await liveBackup(mode, g, 'small');
    const running = vhdvaultAsync(...liveArgs(mode, g, 'small', '--full', '--max-read', '2M', '--fleecing-max', '1M')); // full: slow enough to be written under
    await exportShown(g);
    await write(g, 0x08, 6 * MiB, 8 * MiB); // succeeds: copies go to the fleecing image, past its max
    const r = await running;
    expect(r.code, r.stderr).toBe(1);
    expect(JSON.parse(r.stdout)).toMatchObject({ error: { code: 1, message: expect.stringMatching(/past --fleecing-max/) } }); // --json: the failure as JSON too
    expect(r.stderr.trimEnd().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/fleecing image grew to \d+ bytes, past --fleecing-max 1048576: backup aborted/);
    // The previous checkpoint got the writes back, and records again.
    expect(await ours(g)).toEqual({ nodes: [], exports: [], bitmaps: [{ name: first.checkpoint, recording: true, inconsistent: false }] });
    expect(await readdir(fleecing)).toEqual([]);
    await run('qemu-io', ['-f', 'raw', '-r', '-c', `read -P 0x08 ${6 * MiB} ${8 * MiB}`, g.qsd.guestUri]);
    const next = await liveBackup(mode, g, 'small');
    expect(next).toMatchObject({ kind: 'delta', previousCheckpoint: first.checkpoint, bytesRead: 4 * BLOCK });
    expect((await restored('small', next.id)).equals(g.bytes)).toBe(true);
  });
});

describe.skipIf(!hasQsd)('backup --qemu, fleecing folder on a full filesystem', () => {
  it('fails the backup with a clear line when the folder fills up; the guest never sees an error', async (ctx) => {
    const smallFolder = join(dir, 'small-tmpfs');
    await run('mkdir', ['-p', smallFolder]);
    if (!mountTmpfs(smallFolder, '4m')) {
      if (process.env.CI) throw new Error('CI runs as root and must be able to mount a tmpfs for this test');
      ctx.skip();
    }
    onTestFinished(() => run('umount', ['-l', smallFolder]).then(() => undefined));
    const size = 16 * MiB;
    const g = await startGuest('qcow2', size);
    await write(g, 0x21, 0, size);
    const running = vhdvaultAsync('backup', repo, 'full-fs', '--qemu', g.qsd.qmpSocket, '--node', 'g0', '--fleecing', smallFolder, '--qemu-nbd', `nbd+unix:///?socket=${g.qsd.nbdSocket}`, '--max-read', '2M');
    await exportShown(g);
    await write(g, 0x22, 4 * MiB, 12 * MiB); // 12 MiB of old data to copy into 4 MiB: succeeds anyway
    const r = await running;
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr.trimEnd().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/fleecing folder is full \(\d+ bytes free, the image holds \d+\): .*backup aborted \(the guest's writes went on unharmed\)$/m);
    expect(await ours(g)).toEqual({ nodes: [], exports: [], bitmaps: [] });
    expect(await readdir(smallFolder)).toEqual([]);
    await run('qemu-io', ['-f', 'raw', '-r', '-c', `read -P 0x22 ${4 * MiB} ${12 * MiB}`, g.qsd.guestUri]);
    // Nothing committed: the disk has no backup, and list says so (as JSON too).
    const list = await vhdvaultAsync('list', repo, 'full-fs', '--json');
    expect(list.code).toBe(1);
    expect((JSON.parse(list.stdout) as { error: { message: string } }).error.message).toMatch(/has no backups of disk "full-fs"/);
  });
});
