/**
 * Live backups of a VM's disk device (`--device`): the copy-before-write
 * filter goes under the device's drive with qom-set, in both modes, with no
 * NBD server running in QEMU (vhdvault starts its own and stops it again).
 * Against qemu-system-x86_64 (test/helpers/vm.ts).
 */
import { spawn } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CLI, cliEnv, vhdvaultAsync } from './helpers/cli.js';
import { tempDir } from './helpers/files.js';
import { liveReport } from './helpers/live.js';
import { run } from './helpers/qsd.js';
import { initRepo } from './helpers/store.js';
import { hasVm, startVm, type Vm } from './helpers/vm.js';
import { qomGet, queryBlockExports, queryNamedBlockNodes } from '../src/qmp/commands.js';

const MiB = 1024 * 1024;
const dir = await tempDir('vhdvault-livevm-');
const repo = join(dir, 'repo');
await initRepo(repo, 'dir');
const fleecing = join(dir, 'fleece');
await run('mkdir', ['-p', fleecing]);

type Mode = 'fleecing' | 'direct';

const args = (mode: Mode, vm: Vm, disk: string, ...extra: string[]) => ['backup', repo, disk, '--qemu', vm.qmpSocket, '--device', 'vd0', '--node', 'disk0', ...(mode === 'fleecing' ? ['--fleecing', fleecing] : []), '--json', ...extra];

async function restored(disk: string, id: string): Promise<Buffer> {
  const out = join(dir, `${disk}-${id}.raw`);
  const r = await vhdvaultAsync('restore', repo, disk, out, '--backup', id);
  expect(r.code, r.stderr).toBe(0);
  return readFile(out);
}

const exportShown = async (vm: Vm) => {
  while (!(await queryBlockExports(vm.qmp)).some((e) => e.id.startsWith('vhdvault-'))) await new Promise((r) => setTimeout(r, 20));
};

/** Nothing of ours in QEMU: nodes, exports, NBD server; the device back on disk0. */
async function clean(vm: Vm): Promise<void> {
  const nodes = (await queryNamedBlockNodes(vm.qmp)).map((n) => n.nodeName);
  expect(nodes.filter((n) => n.startsWith('vhdvault-'))).toEqual([]);
  expect(await queryBlockExports(vm.qmp)).toEqual([]);
  expect(await qomGet(vm.qmp, '/machine/peripheral/vd0', 'drive')).toBe('disk0');
  // The server we started is stopped: starting one now succeeds.
  await vm.qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: join(dir, 'probe.sock') } } });
  await vm.qmp.execute('nbd-server-stop');
}

describe.skipIf(!hasVm).each(['fleecing', 'direct'] as const)('backup --qemu --device, %s mode', (mode) => {
  it('backs up the disk as it was at the start while the guest writes through the device, then a delta from the checkpoint', async () => {
    const size = 8 * MiB;
    const vm = await startVm(size, 0xaa);
    const model = Buffer.alloc(size, 0xaa);
    const disk = `vm-${mode}`;
    try {
      const running = vhdvaultAsync(...args(mode, vm, disk, '--max-read', '2M'));
      await exportShown(vm);
      const a = Buffer.from(model);
      await vm.write(0xbb, 4 * MiB, 4 * MiB); // the last two blocks, read a second or more from now
      model.fill(0xbb, 4 * MiB);
      const first = liveReport(await running);
      expect(first).toMatchObject({ mode, kind: 'full', previousCheckpoint: null, bytesRead: size });
      expect(first.copiedBytes).toBeGreaterThanOrEqual(4 * MiB);
      expect((await restored(disk, first.id)).equals(a)).toBe(true);
      await clean(vm);

      await vm.write(0xcc, 64 * 1024, 64 * 1024);
      model.fill(0xcc, 64 * 1024, 128 * 1024);
      const second = liveReport(await vhdvaultAsync(...args(mode, vm, disk)));
      expect(second).toMatchObject({ kind: 'delta', previousCheckpoint: first.checkpoint, bytesRead: 6 * MiB }); // block 0, and the two the guest wrote during the first backup
      expect((await restored(disk, second.id)).equals(model)).toBe(true);
      await clean(vm);
    } finally {
      await vm.quit();
    }
    // The guest's writes all landed on the disk.
    await run('qemu-img', ['convert', '-O', 'raw', vm.image, join(dir, `${disk}-after.raw`)]);
    expect((await readFile(join(dir, `${disk}-after.raw`))).equals(model)).toBe(true);
  });
});

describe.skipIf(!hasVm)('backup --qemu --device after a kill', () => {
  it('takes the filter a killed run left out from under the device, and stops the NBD server it started', async () => {
    const size = 8 * MiB;
    const vm = await startVm(size, 0x11);
    const model = Buffer.alloc(size, 0x11);
    try {
      const child = spawn(process.execPath, [CLI, ...args('fleecing', vm, 'vm-killed', '--max-read', '1M')], { stdio: 'ignore', env: cliEnv() });
      const gone = new Promise((resolve) => child.once('exit', resolve));
      await exportShown(vm);
      child.kill('SIGKILL');
      await gone;
      expect(await qomGet(vm.qmp, '/machine/peripheral/vd0', 'drive')).toMatch(/^vhdvault-[0-9a-f]{8}-\d+-c$/);
      await vm.write(0x12, 0, MiB); // through the orphaned filter
      model.fill(0x12, 0, MiB);
      const r = liveReport(await vhdvaultAsync(...args('fleecing', vm, 'vm-killed')));
      expect(r).toMatchObject({ kind: 'full', bytesRead: size });
      expect((await restored('vm-killed', r.id)).equals(model)).toBe(true);
      await clean(vm);
      expect(await readdir(fleecing)).toEqual([]);
    } finally {
      await vm.quit();
    }
  });
});

describe.skipIf(!hasVm)('backup --qemu --device, two disks at once', () => {
  it('backs up two disks of one VM at the same time (each through its own monitor), in both modes, sharing the NBD server vhdvault starts', async () => {
    const size = 8 * MiB;
    const vm = await startVm(size, 0x31, 2);
    const models = [Buffer.alloc(size, 0x31), Buffer.alloc(size, 0x31)];
    try {
      const argsOf = (i: number, mode: Mode) => ['backup', repo, `pair${i}`, '--qemu', i === 0 ? vm.qmpSocket : vm.qmpSocket2, '--device', `vd${i}`, '--node', `disk${i}`, ...(mode === 'fleecing' ? ['--fleecing', fleecing] : []), '--json', '--max-read', '4M'];
      let settled = 0;
      const running = [vhdvaultAsync(...argsOf(0, 'fleecing')), vhdvaultAsync(...argsOf(1, 'direct'))].map((p) => p.finally(() => settled++));
      // Both views exist at once before the guest writes.
      while ((await queryBlockExports(vm.qmp)).filter((e) => e.id.startsWith('vhdvault-')).length < 2) {
        if (settled > 0) throw new Error(`a backup ended before both views existed: ${JSON.stringify(await Promise.all(running))}`);
        await new Promise((r) => setTimeout(r, 20));
      }
      const frozen = models.map((m) => Buffer.from(m));
      for (const i of [0, 1]) {
        await vm.write(0x40 + i, 6 * MiB, 2 * MiB, i);
        models[i]!.fill(0x40 + i, 6 * MiB);
      }
      const reports = (await Promise.all(running)).map((r) => liveReport(r));
      for (const i of [0, 1]) {
        expect(reports[i]).toMatchObject({ kind: 'full', mode: i === 0 ? 'fleecing' : 'direct' });
        expect((await restored(`pair${i}`, reports[i]!.id)).equals(frozen[i]!), `pair${i}`).toBe(true);
      }
      await clean(vm);
      expect(await qomGet(vm.qmp, '/machine/peripheral/vd1', 'drive')).toBe('disk1');
    } finally {
      await vm.quit();
    }
  });
});

describe.skipIf(!hasVm)('backup --qemu --device, one disk twice at once', () => {
  it('refuses a second live backup of a disk while one runs, naming its process, and leaves the first alone', async () => {
    const vm = await startVm(8 * MiB, 0x51);
    try {
      const first = vhdvaultAsync(...args('fleecing', vm, 'twice-a', '--max-read', '2M'));
      await exportShown(vm);
      const second = await vhdvaultAsync('backup', repo, 'twice-b', '--qemu', vm.qmpSocket2, '--device', 'vd0', '--node', 'disk0', '--fleecing', fleecing);
      expect(second.code).toBe(1);
      expect(second.stderr.trim().split('\n')).toHaveLength(1);
      expect(second.stderr).toMatch(/the view of a live backup running in process \d+: one live backup of a disk at a time/);
      expect(liveReport(await first)).toMatchObject({ kind: 'full', bytesRead: 8 * MiB });
      await clean(vm);
    } finally {
      await vm.quit();
    }
  });
});
