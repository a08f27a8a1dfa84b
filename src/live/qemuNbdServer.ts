/**
 * The NBD server inside QEMU that exports the frozen view to us. QEMU runs
 * at most one, and QMP cannot say where it listens. We start ours on
 * `$TMPDIR/vhdvault-qemu-<hash of the QMP socket>/nbd.sock`; when QEMU
 * already runs a server, it is one a vhdvault started (from another monitor,
 * a run that was killed, a backup of another disk running now) if one of
 * those sockets serves our export, else QEMU's own (then --qemu-nbd must
 * name it). A server of ours is stopped only when no export is left on it.
 */
import { createHash } from 'node:crypto';
import { mkdir, readdir, realpath, rm, rmdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { NbdClient } from '../nbd/NbdClient.js';
import { type NbdEndpoint, nbdAddress } from '../nbd/uri.js';
import { socketState } from '../util/unixSocket.js';
import { VaultError } from '../util/errors.js';
import { nbdServerStart, nbdServerStop, queryBlockExports } from '../qmp/commands.js';
import { QmpCommandError } from '../qmp/errors.js';
import { OUR_PREFIX } from './guestPath.js';
import type { QmpClient } from '../qmp/QmpClient.js';

export interface QemuNbdServer {
  /** Where QEMU serves `exportName` (just added with block-export-add). */
  locate(exportName: string): Promise<NbdEndpoint>;
  /** Once our export is deleted: stop the server if a vhdvault started it and nothing else is exported on it. */
  release(): Promise<void>;
}

const SERVER_DIR = `${OUR_PREFIX}qemu-`;
const alreadyRunning = (err: unknown) => err instanceof QmpCommandError && /already running/i.test(err.desc);

/** Use the server `given` names, or one of ours. */
export async function qemuNbdServer(qmp: QmpClient, given: NbdEndpoint | null): Promise<QemuNbdServer> {
  if (given) return { locate: async () => given, release: async () => {} };
  const qmpPath = await realpath(qmp.socketPath).catch(() => qmp.socketPath);
  // Short: a Unix socket's path must fit in 108 bytes.
  const dir = join(tmpdir(), `${SERVER_DIR}${createHash('sha256').update(qmpPath).digest('hex').slice(0, 12)}`);
  const socket = join(dir, 'nbd.sock');
  await mkdir(dir, { recursive: true, mode: 0o700 });
  let ours: string | null = socket;
  try {
    await nbdServerStart(qmp, socket);
  } catch (err) {
    if (!alreadyRunning(err)) throw err;
    ours = null;
    await rmdir(dir).catch(() => undefined); // (only if empty: nothing of a server of ours is in it)
  }
  return {
    locate: async (exportName) => {
      ours ??= await serving(exportName);
      if (ours === null) throw new VaultError(qmp.socketPath, 'QEMU already runs an NBD server: give its address with --qemu-nbd <uri>');
      return { transport: 'unix', socket: ours };
    },
    release: async () => {
      if (ours === null) return;
      // Stopping the server deletes every export on it.
      if ((await queryBlockExports(qmp)).some((e) => e.type === 'nbd')) return;
      await nbdServerStop(qmp).catch((err: unknown) => {
        if (!(err instanceof QmpCommandError && /not running/i.test(err.desc))) throw err;
      });
      await rm(dirname(ours), { recursive: true, force: true });
    },
  };
}

/** The socket of ours that serves `exportName`: export names hold the backup id, so a match is this QEMU. */
async function serving(exportName: string): Promise<string | null> {
  for (const name of await readdir(tmpdir()).catch(() => [])) {
    if (!name.startsWith(SERVER_DIR)) continue;
    const socket = join(tmpdir(), name, 'nbd.sock');
    if ((await socketState(socket)) !== 'listening') continue;
    const client = await NbdClient.connect(nbdAddress({ transport: 'unix', socket }, exportName), { timeoutMs: 5000 }).catch(() => null);
    if (!client) continue;
    await client.disconnect();
    return socket;
  }
  return null;
}
