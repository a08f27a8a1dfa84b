/**
 * NBD servers for tests: qemu-nbd and nbdkit listening on a Unix socket (never
 * a network port), ready once the socket accepts a connection. Every server
 * started here is stopped by stopServers() (register it with afterAll), and
 * each can be stopped earlier by stop(); both kill only that server's pid.
 * Also the CLI run with extra environment and its peak memory measured.
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { CLI, cliEnv, type CliResult } from './cli.js';
import { accepts } from './sockets.js';

const has = (cmd: string, arg = '--version') => spawnSync(cmd, [arg]).status === 0;

/** qemu-nbd comes with qemu-img (qemu-utils): required under CI like the other interop tests. */
export const hasQemuNbd = has('qemu-nbd') && has('qemu-io') && has('qemu-img');
/** nbdkit (Debian: nbdkit) with its basic plugins, memory and data. */
export const hasNbdkit = has('nbdkit');
if (process.env.CI && !(hasQemuNbd && hasNbdkit)) throw new Error('qemu-nbd, qemu-io or nbdkit is missing: CI must install qemu-utils and nbdkit');

export const unixUri = (socket: string, query = '') => `nbd+unix:///?socket=${socket}${query}`;

export interface RunningServer {
  socket: string;
  stop(): Promise<void>;
}

const running = new Set<ChildProcess>();

/** qemu-nbd -t (it outlives each client: the readiness probe is one) on `socket`, with `args` (format, -r, -B, the image). */
export function qemuNbd(socket: string, args: string[]): Promise<RunningServer> {
  return serve('qemu-nbd', ['-t', '-k', socket, ...args], socket);
}

/** nbdkit in the foreground, dying with us whatever happens, on `socket`: `args` are the plugin and its parameters. */
export function nbdkit(socket: string, args: string[]): Promise<RunningServer> {
  return serve('nbdkit', ['-f', '--exit-with-parent', '-U', socket, ...args], socket);
}

export async function stopServers(): Promise<void> {
  await Promise.all([...running].map(stopChild));
}

async function serve(cmd: string, args: string[], socket: string): Promise<RunningServer> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  running.add(child);
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<never>((_, reject) => {
    child.once('error', reject);
    child.once('exit', (code, signal) => reject(new Error(`${cmd} ${args.join(' ')} exited (${code ?? signal}) before listening: ${stderr.trim()}`)));
  });
  exited.catch(() => undefined);
  try {
    await Promise.race([accepts(socket, 10_000), exited]);
  } catch (err) {
    await stopChild(child);
    throw err;
  }
  return { socket, stop: () => stopChild(child) };
}


async function stopChild(child: ChildProcess): Promise<void> {
  running.delete(child);
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  await gone;
  clearTimeout(timer);
}

export interface MeasuredRun extends CliResult {
  /** Peak resident memory of the CLI process, in KiB (GNU time's %M); null when /usr/bin/time is missing. */
  maxRssKiB: number | null;
  elapsedMs: number;
}

export const hasGnuTime = spawnSync('/usr/bin/time', ['-f', '%M', 'true']).status === 0;

/**
 * Run the built CLI without blocking (a fake server in this process must go
 * on answering), with `env` added, under GNU time when it is there.
 */
export function vhdvaultMeasured(env: NodeJS.ProcessEnv, statsFile: string, ...args: string[]): Promise<MeasuredRun> {
  const started = Date.now();
  const [cmd, argv] = hasGnuTime ? ['/usr/bin/time', ['-f', '%M', '-o', statsFile, process.execPath, CLI, ...args]] : [process.execPath, [CLI, ...args]];
  return new Promise((resolve, reject) => {
    const child = spawn(cmd as string, argv as string[], { stdio: ['ignore', 'pipe', 'pipe'], env: cliEnv(env) });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', async (code) => {
      const maxRssKiB = hasGnuTime ? Number((await readFile(statsFile, 'utf8')).trim().split('\n').pop()) : null;
      resolve({ code: code ?? -1, stdout, stderr, maxRssKiB, elapsedMs: Date.now() - started });
    });
  });
}
