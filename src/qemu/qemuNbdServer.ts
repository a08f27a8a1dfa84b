/**
 * The NBD server inside QEMU that exports the frozen view to us. QEMU runs
 * at most one. We start it on a socket whose path follows from the QMP
 * socket's, so a later run finds a server a killed run (or a backup of
 * another disk of the same QEMU, running now) started, and stop it only
 * when no export is left on it.
 */
import { createHash } from 'node:crypto';
import { mkdir, realpath, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { NbdEndpoint } from '../nbd/uri.js';
import { socketState } from '../util/unixSocket.js';
import { VhdError } from '../vhd/errors.js';
import { nbdServerStart, nbdServerStop, queryBlockExports } from './commands.js';
import { QmpCommandError } from './errors.js';
import { OUR_PREFIX } from './guestPath.js';
import type { QmpClient } from './QmpClient.js';

export interface QemuNbdServer {
  endpoint: NbdEndpoint;
  /** Once our export is deleted: stop the server if we started it and nothing else is exported on it. */
  release(): Promise<void>;
}

const alreadyRunning = (err: unknown) => err instanceof QmpCommandError && /already running/i.test(err.desc);

/** Use the server `given` names (QMP cannot tell where a running server listens), or one of ours. */
export async function qemuNbdServer(qmp: QmpClient, given: NbdEndpoint | null): Promise<QemuNbdServer> {
  if (given) return { endpoint: given, release: async () => {} };
  const qmpPath = await realpath(qmp.socketPath).catch(() => qmp.socketPath);
  // Short: a Unix socket's path must fit in 108 bytes.
  const dir = join(tmpdir(), `${OUR_PREFIX}qemu-${createHash('sha256').update(qmpPath).digest('hex').slice(0, 12)}`);
  const socket = join(dir, 'nbd.sock');
  await mkdir(dir, { recursive: true, mode: 0o700 });
  try {
    await nbdServerStart(qmp, socket);
  } catch (err) {
    if (!alreadyRunning(err)) throw err;
    if ((await socketState(socket)) !== 'listening') throw new VhdError(qmp.socketPath, 'QEMU already runs an NBD server: give its address with --qemu-nbd <uri>');
  }
  return {
    endpoint: { transport: 'unix', socket },
    release: async () => {
      // Stopping the server deletes every export on it.
      if ((await queryBlockExports(qmp)).some((e) => e.type === 'nbd')) return;
      await nbdServerStop(qmp).catch((err: unknown) => {
        if (!(err instanceof QmpCommandError && /not running/i.test(err.desc))) throw err;
      });
      await rm(dir, { recursive: true, force: true });
    },
  };
}
