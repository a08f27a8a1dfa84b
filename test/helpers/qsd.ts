/**
 * A stand-in for a running VM: qemu-storage-daemon serving one disk image,
 * as docs/design/09-live-backups.md §9 describes a guest. The guest's path is
 * file node f0 → format node disk0 → raw passthrough g0, exported writable
 * over NBD as `disk0` (the "guest" writes there), with a QMP monitor. Every
 * daemon started here is killed after the test file; stop() and kill() end
 * one earlier, cleanly or not.
 */
import { type ChildProcess, execFile, spawn, spawnSync } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll } from 'vitest';
import { accepts } from './sockets.js';

export const run = promisify(execFile);

export const hasQsd = spawnSync('qemu-storage-daemon', ['--version']).status === 0 && spawnSync('qemu-io', ['--version']).status === 0;
if (!hasQsd && process.env.CI) throw new Error('qemu-storage-daemon or qemu-io is missing: CI must install qemu-system-common and qemu-utils');

export interface QsdOptions {
  format?: 'qcow2' | 'raw';
  /** Bytes; default 64 MiB. */
  size?: number;
  /** Serve this image (of `format`) instead of a new one: a restart after stop() or kill(). */
  image?: string;
  /** A second QMP monitor (`qmpSocket2`), for a test to watch QEMU while vhdvault holds the first one. */
  secondMonitor?: boolean;
}

export interface Qsd {
  dir: string;
  image: string;
  format: 'qcow2' | 'raw';
  size: number;
  qmpSocket: string;
  /** The second monitor's socket, when asked for. */
  qmpSocket2: string | null;
  nbdSocket: string;
  /** The guest's writable export, for qemu-io. */
  guestUri: string;
  pid: number;
  /** SIGTERM: a clean stop (persistent bitmaps are written); resolves once it exited. */
  stop(): Promise<void>;
  /** SIGKILL: an unclean stop, as a host crash; resolves once it exited. */
  kill(): Promise<void>;
}

const running = new Set<ChildProcess>();
const dirs: string[] = [];
afterAll(async () => {
  await Promise.all([...running].map((child) => end(child, 'SIGKILL')));
  await Promise.all(dirs.map((dir) => rm(dir, { recursive: true, force: true })));
});

export const nbdUri = (socket: string, exportName: string) => `nbd+unix:///${exportName}?socket=${socket}`;

export async function startQsd(options: QsdOptions = {}): Promise<Qsd> {
  const format = options.format ?? 'qcow2';
  const size = options.size ?? 64 * 1024 * 1024;
  // Short: a Unix socket's path must fit in 108 bytes.
  const dir = await mkdtemp(join(tmpdir(), 'vhdvault-qsd-'));
  dirs.push(dir);
  const image = options.image ?? join(dir, `disk.${format}`);
  if (!options.image) await run('qemu-img', ['create', '-q', '-f', format, image, String(size)]);
  const qmpSocket = join(dir, 'qmp.sock');
  const nbdSocket = join(dir, 'nbd.sock');
  const qmpSocket2 = options.secondMonitor ? join(dir, 'qmp2.sock') : null;
  const args = [
    ...['--blockdev', `driver=file,node-name=f0,filename=${image}`],
    ...['--blockdev', `driver=${format},node-name=disk0,file=f0`],
    ...['--blockdev', 'driver=raw,node-name=g0,file=disk0'],
    ...['--nbd-server', `addr.type=unix,addr.path=${nbdSocket}`],
    ...['--export', 'type=nbd,id=guest,node-name=g0,name=disk0,writable=on'],
    ...['--chardev', `socket,path=${qmpSocket},server=on,wait=off,id=m0`, '--monitor', 'chardev=m0'],
    ...(qmpSocket2 ? ['--chardev', `socket,path=${qmpSocket2},server=on,wait=off,id=m1`, '--monitor', 'chardev=m1'] : []),
  ];
  const child = spawn('qemu-storage-daemon', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  running.add(child);
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<never>((_, reject) => {
    child.once('error', reject);
    child.once('exit', (code, signal) => reject(new Error(`qemu-storage-daemon exited (${code ?? signal}) before listening: ${stderr.trim()}`)));
  });
  exited.catch(() => undefined);
  try {
    // The monitor serves one client at a time: this probe lets go at once, so the test's client is next.
    await Promise.race([Promise.all([accepts(nbdSocket), accepts(qmpSocket), ...(qmpSocket2 ? [accepts(qmpSocket2)] : [])]), exited]);
  } catch (err) {
    await end(child, 'SIGKILL');
    throw err;
  }
  return {
    dir,
    image,
    format,
    size,
    qmpSocket,
    qmpSocket2,
    nbdSocket,
    guestUri: nbdUri(nbdSocket, 'disk0'),
    pid: child.pid!,
    stop: () => end(child, 'SIGTERM'),
    kill: () => end(child, 'SIGKILL'),
  };
}


async function end(child: ChildProcess, signal: NodeJS.Signals): Promise<void> {
  running.delete(child);
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill(signal);
  // A clean stop that hangs becomes an unclean one.
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  await gone;
  clearTimeout(timer);
}
