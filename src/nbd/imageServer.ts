/**
 * An image file in a format QEMU reads (qcow2, VMDK, VDI, VHDX, …), served
 * read-only by a qemu-nbd that we start for one backup and stop after it: its
 * bytes are a container, and QEMU's block layer is what knows the disk inside.
 * The server listens on a Unix socket in a private folder; it dies with us
 * (`setpriv --pdeathsig`), so a killed backup leaves no server behind.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { VaultError } from '../util/errors.js';
import { processTempDir } from '../util/files.js';
import { withDeathSignal } from '../util/processes.js';
import { socketState } from '../util/unixSocket.js';
import { NbdSource } from './NbdSource.js';

const START_MS = 15_000;
/** Our folders: `vhdvault-image-<pid>-<random>`, so that a killed run's is told by its pid. */
const PREFIX = 'vhdvault-image-';

/**
 * A backup source reading the disk inside `path` (an image of `format`) through qemu-nbd;
 * with `bitmap`, the image's persistent dirty bitmap of that name is exported too.
 */
export async function openImageThroughQemuNbd(path: string, format: string, bitmap: string | null = null): Promise<NbdSource> {
  // A killed backup's folder goes at the next (its server died with it).
  const dir = await processTempDir(PREFIX);
  const socket = join(dir, 'nbd.sock');
  let child: ChildProcess | null = null;
  const stop = async () => {
    if (child && child.exitCode === null && child.signalCode === null) {
      const gone = once(child, 'exit');
      child.kill('SIGTERM');
      await gone;
    }
    await rm(dir, { recursive: true, force: true });
  };
  try {
    const server = await startServer(path, format, socket, bitmap);
    child = server.child;
    try {
      return await NbdSource.open(`nbd+unix:///?socket=${socket}`, { afterClose: stop, bitmap });
    } catch (err) {
      // A server that listened, then gave up on the image: its own words say why.
      const gone = () => server.child.exitCode !== null || server.child.signalCode !== null;
      const exited = gone() || (await Promise.race([once(server.child, 'exit').then(() => true), sleep(2000).then(gone)]));
      throw exited ? serverError(path, format, new Error('exited'), server.stderr()) : err;
    }
  } catch (err) {
    await stop();
    throw err;
  }
}

async function startServer(path: string, format: string, socket: string, bitmap: string | null): Promise<{ child: ChildProcess; stderr(): string }> {
  const args = ['--read-only', '--format', format, '--socket', socket, '--persistent', ...(bitmap === null ? [] : ['--bitmap', bitmap]), path];
  const [command, ...argv] = withDeathSignal(['qemu-nbd', ...args]);
  const child = spawn(command!, argv, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (c: string) => (stderr = (stderr + c).slice(-2000)));
  const failed = new Promise<Error>((resolve) => {
    child.once('error', (err: NodeJS.ErrnoException) => resolve(err));
    child.once('exit', () => resolve(new Error(stderr)));
  });
  const deadline = Date.now() + START_MS;
  // Listening, not only there: qemu-nbd binds the socket's file before it listens, and a connection in between is refused.
  while ((await socketState(socket)) !== 'listening') {
    const err = await Promise.race([failed, sleep(20).then(() => null)]);
    if (err) throw serverError(path, format, err, stderr);
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new VaultError(path, `qemu-nbd did not serve the ${format} image within ${START_MS / 1000} s`);
    }
  }
  return { child, stderr: () => stderr };
}

function serverError(path: string, format: string, err: Error, stderr: string): VaultError {
  if ((err as NodeJS.ErrnoException).code === 'ENOENT' || /qemu-nbd.*(No such file|not found)/i.test(stderr)) {
    return new VaultError(path, `is a ${format} image: reading the disk inside needs qemu-nbd (Debian package qemu-utils), or convert it with qemu-img first`);
  }
  const line = stderr.split('\n').map((l) => l.trim()).find((l) => l !== '') ?? err.message;
  return new VaultError(path, `qemu-nbd cannot open this ${format} image: ${line.replace(/^qemu-nbd: /, '')}`);
}
