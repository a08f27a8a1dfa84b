/**
 * The live demo's running VM, as the tests set one up (test/helpers/qsd.ts):
 * qemu-storage-daemon serving a qcow2 image through file node f0 → qcow2
 * node disk0 → raw passthrough node g0, exported writable over NBD as `disk0`
 * (the guest writes there), with a QMP monitor for vhdvault. Also the guest's
 * side: writes with qemu-io, a writer that keeps writing, and copies of the
 * disk with qemu-img. Every process started here is tracked, so that an
 * interrupted demo can kill them all at once (killAll).
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { MIN_VERSION } from '../qmp/QmpClient.js';
import { versionAtLeast } from '../qmp/qmpWire.js';
import { socketState } from '../util/unixSocket.js';

/** Also in the message a missing tool prints: where Debian has them. */
export const QEMU_PACKAGES = 'qemu-system-common qemu-utils';
const TOOLS = ['qemu-storage-daemon', 'qemu-io', 'qemu-img'];

/** Why the live demo cannot run here (null when it can), and the daemon's name and version. */
export function qemuTools(): { problem: string | null; daemon: string } {
  const runs = TOOLS.map((tool) => spawnSync(tool, ['--version'], { encoding: 'utf8' }));
  const missing = TOOLS.filter((_, i) => runs[i]!.status !== 0);
  if (missing.length > 0) return { problem: `${missing.join(', ')} not found`, daemon: '' };
  const m = /version ((\d+)\.(\d+)\.(\d+))/.exec(runs[0]!.stdout);
  const daemon = `qemu-storage-daemon ${m?.[1] ?? ''}`.trimEnd();
  // An unknown version is let through: our QMP client checks it again.
  const tooOld = m !== null && !versionAtLeast({ major: Number(m[2]), minor: Number(m[3]), micro: Number(m[4]) }, MIN_VERSION);
  return { problem: tooOld ? `${daemon} is too old (live backups need ${MIN_VERSION.major}.${MIN_VERSION.minor})` : null, daemon };
}

const running = new Set<ChildProcess>();

/** SIGKILL every process still running: for a signal handler, which cannot wait. */
export function killAll(): void {
  for (const child of running) child.kill('SIGKILL');
}

function track(child: ChildProcess): ChildProcess {
  running.add(child);
  child.once('exit', () => running.delete(child));
  return child;
}

/** Run a tool to its end; a failure names it with its stderr. */
export function runTool(tool: string, args: string[]): Promise<void> {
  const child = track(spawn(tool, args, { stdio: ['ignore', 'ignore', 'pipe'] }));
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  return new Promise((resolve, reject) => {
    child.once('error', reject);
    child.once('exit', (code, signal) => (code === 0 ? resolve() : reject(new Error(`${tool} ${args.join(' ')} failed (${code ?? signal}): ${stderr.trim()}`))));
  });
}

export interface Daemon {
  qmpSocket: string;
  /** A second monitor, when asked for: to watch QEMU while vhdvault holds the first. */
  watchSocket: string | null;
  nbdSocket: string;
  /** The guest's writable export. */
  guestUri: string;
  /** SIGTERM (persistent bitmaps are written), SIGKILL if it hangs; resolves once it exited. */
  stop(): Promise<void>;
}

/** Start the daemon on `image` (qcow2), its sockets in `dir`, which must be short: a socket path fits in 108 bytes. */
export async function startDaemon(dir: string, image: string, options: { watchMonitor?: boolean; iothread?: boolean } = {}): Promise<Daemon> {
  const qmpSocket = join(dir, 'qmp.sock');
  const watchSocket = options.watchMonitor ? join(dir, 'qmp2.sock') : null;
  const nbdSocket = join(dir, 'nbd.sock');
  const args = [
    ...['--blockdev', `driver=file,node-name=f0,filename=${image}`],
    ...['--blockdev', 'driver=qcow2,node-name=disk0,file=f0'],
    ...['--blockdev', 'driver=raw,node-name=g0,file=disk0'],
    ...['--nbd-server', `addr.type=unix,addr.path=${nbdSocket}`],
    // With an iothread, the guest's disk and its export run there, off the main loop that serves QMP and our NBD reads.
    ...(options.iothread ? ['--object', 'iothread,id=io0'] : []),
    ...['--export', `type=nbd,id=guest,node-name=g0,name=disk0,writable=on${options.iothread ? ',iothread=io0' : ''}`],
    ...['--chardev', `socket,path=${qmpSocket},server=on,wait=off,id=m0`, '--monitor', 'chardev=m0'],
    ...(watchSocket ? ['--chardev', `socket,path=${watchSocket},server=on,wait=off,id=m1`, '--monitor', 'chardev=m1'] : []),
  ];
  const child = track(spawn('qemu-storage-daemon', args, { stdio: ['ignore', 'ignore', 'pipe'] }));
  // Kept for an error message only: our socket probes make it log "option negotiation failed".
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const stop = stopper(child);
  try {
    await Promise.all([listening(nbdSocket), listening(qmpSocket), ...(watchSocket ? [listening(watchSocket)] : [])]);
  } catch (err) {
    await stop();
    throw new Error(`qemu-storage-daemon did not come up: ${(err as Error).message}; ${stderr.trim()}`);
  }
  return { qmpSocket, watchSocket, nbdSocket, guestUri: `nbd+unix:///disk0?socket=${nbdSocket}`, stop };
}

/** How to stop a QEMU process: SIGTERM (persistent bitmaps are written), SIGKILL after 5 s; resolves once it exited. */
export function stopper(child: ChildProcess): () => Promise<void> {
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  return async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
  };
}

/** Resolves once the daemon accepts connections on `socket`: it creates the socket when it is ready. */
async function listening(socket: string, withinMs = 10_000): Promise<void> {
  const deadline = Date.now() + withinMs;
  for (;;) {
    if ((await socketState(socket)) === 'listening') return;
    if (Date.now() > deadline) throw new Error(`nothing listens on ${socket} after ${withinMs} ms`);
    await sleep(20);
  }
}

/** A guest write of `length` bytes of `pattern` at `offset`. */
export function guestWrite(uri: string, pattern: number, offset: number, length: number): Promise<void> {
  return runTool('qemu-io', ['-f', 'raw', '-c', `write -P ${pattern} ${offset} ${length}`, uri]);
}

/** Copy the guest's disk as it is now to a raw file (sparse), with qemu-img: a reference independent of vhdvault. */
export function copyGuestDisk(uri: string, out: string): Promise<void> {
  return runTool('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out]);
}

/**
 * A guest that keeps writing once started: `chunk` bytes of `pattern` at a
 * time, cycling through `length` bytes from `offset`, one qemu-io run each
 * (so each write is counted once it landed), a short pause between them.
 */
export class GuestWriter {
  /** Writes that landed so far. */
  writes = 0;
  private stopping = false;
  private loop: Promise<void> | null = null;

  constructor(
    private readonly uri: string,
    readonly pattern: number,
    private readonly region: { offset: number; length: number; chunk: number },
  ) {}

  /** Start writing; later calls do nothing. */
  start(): void {
    if (this.loop) return;
    this.loop = this.run();
    this.loop.catch(() => undefined); // reported by stop()
  }

  /** Let the write in flight finish, then stop; a failed write is thrown here. */
  async stop(): Promise<void> {
    this.stopping = true;
    await this.loop;
  }

  private async run(): Promise<void> {
    const { offset, length, chunk } = this.region;
    for (let i = 0; !this.stopping; i++) {
      await guestWrite(this.uri, this.pattern, offset + ((i * chunk) % length), chunk);
      this.writes++;
      await sleep(20);
    }
  }
}
