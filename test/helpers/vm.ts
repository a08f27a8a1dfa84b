/**
 * A VM for live backups through a disk device: qemu-system-x86_64 with no
 * guest OS (it idles in the firmware), qcow2 disks (file node f<i> →
 * format node disk<i>) on virtio-blk devices `vd<i>`, and three QMP monitors:
 * two for vhdvault (a monitor serves one client at a time), one for the test. The "guest" writes through the device
 * with HMP's qemu-io (`-d` the device's backend), which goes through
 * whatever node the device uses, as a guest's own writes would.
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll } from 'vitest';
import { QmpClient } from '../../src/qmp/QmpClient.js';
import { run } from './qsd.js';
import { accepts } from './sockets.js';

export const hasVm = spawnSync('qemu-system-x86_64', ['--version']).status === 0;
if (!hasVm && process.env.CI) throw new Error('qemu-system-x86_64 is missing: CI must install qemu-system-x86');

/** The QOM path of disk `i`'s block backend, for HMP's qemu-io. */
const backend = (i: number) => `/machine/peripheral/vd${i}/virtio-backend`;

export interface Vm {
  /** The image of each disk. */
  images: string[];
  image: string;
  /** vhdvault's monitor. */
  qmpSocket: string;
  /** A second one, for a second vhdvault at the same time. */
  qmpSocket2: string;
  /** The test's own monitor. */
  qmp: QmpClient;
  /** A guest write through device vd<disk> (default vd0); throws if qemu-io reports anything but success. */
  write(pattern: number, offset: number, length: number, disk?: number): Promise<void>;
  /** Power off (the image is then consistent on disk); resolves once QEMU exited. */
  quit(): Promise<void>;
}

const running = new Set<ChildProcess>();
const dirs: string[] = [];
afterAll(async () => {
  for (const child of running) child.kill('SIGKILL');
  await Promise.all(dirs.map((dir) => rm(dir, { recursive: true, force: true })));
});

/** A VM over `disks` new qcow2 images of `size` bytes filled with `pattern`. */
export async function startVm(size: number, pattern: number, disks = 1): Promise<Vm> {
  const dir = await mkdtemp(join(tmpdir(), 'vhdvault-vm-'));
  dirs.push(dir);
  const images = Array.from({ length: disks }, (_, i) => join(dir, `disk${i}.qcow2`));
  const drives: string[] = [];
  for (const [i, image] of images.entries()) {
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(size)]);
    await run('qemu-io', ['-f', 'qcow2', '-c', `write -P ${pattern} 0 ${size}`, image]);
    drives.push('-blockdev', `driver=file,node-name=f${i},filename=${image}`, '-blockdev', `driver=qcow2,node-name=disk${i},file=f${i}`, '-device', `virtio-blk-pci,drive=disk${i},id=vd${i}`);
  }
  const qmpSocket = join(dir, 'qmp.sock');
  const qmpSocket2 = join(dir, 'qmp2.sock');
  const testSocket = join(dir, 'qmp-test.sock');
  const child = spawn(
    'qemu-system-x86_64',
    [
      ...['-M', 'q35', '-nodefaults', '-display', 'none', '-m', '64'],
      ...drives,
      ...['-chardev', `socket,path=${qmpSocket},server=on,wait=off,id=m0`, '-mon', 'chardev=m0,mode=control'],
      ...['-chardev', `socket,path=${qmpSocket2},server=on,wait=off,id=m1`, '-mon', 'chardev=m1,mode=control'],
      ...['-chardev', `socket,path=${testSocket},server=on,wait=off,id=m2`, '-mon', 'chardev=m2,mode=control'],
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  running.add(child);
  // HMP qemu-io prints its results on QEMU's stdout, not over QMP.
  let stdout = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  await Promise.race([Promise.all([accepts(qmpSocket), accepts(qmpSocket2), accepts(testSocket)]), exited.then(() => Promise.reject(new Error(`qemu-system-x86_64 exited: ${stderr.trim()}`)))]);
  const qmp = await QmpClient.connect(testSocket);
  return {
    images,
    image: images[0]!,
    qmpSocket,
    qmpSocket2,
    qmp,
    write: async (pattern, offset, length, disk = 0) => {
      const before = stdout.length;
      const reply = await qmp.execute<string>('human-monitor-command', { 'command-line': `qemu-io -d ${backend(disk)} "write -P ${pattern} ${offset} ${length}"` });
      // (The "wrote …" line reaches stdout after the reply: wait for it.)
      for (let i = 0; i < 200 && !stdout.slice(before).includes('wrote'); i++) await new Promise((r) => setTimeout(r, 10));
      const out = reply + stdout.slice(before);
      if (!/wrote \d+\/\d+ bytes/.test(out) || /error|fail/i.test(out)) throw new Error(`guest write failed: ${out.trim()}`);
    },
    quit: async () => {
      await qmp.execute('quit').catch(() => undefined);
      await qmp.close();
      await exited;
      running.delete(child);
    },
  };
}
