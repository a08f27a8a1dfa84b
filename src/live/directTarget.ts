/**
 * Direct mode's copy target: vhdvault's own NBD server, in this process, on
 * a Unix socket, exporting a CopyStore that writes the copied clusters into
 * the repository; QEMU reaches it through an `nbd` block node. A guest write
 * to a cluster not yet copied waits for the backup target.
 */
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { ExportCatalog } from '../nbd/export.js';
import { NbdServer } from '../nbd/NbdServer.js';
import type { CopyStore } from './copyStore.js';
import { processTempDir, removeDeadProcessDirs } from '../util/files.js';
import { blockdevAdd, blockdevDel } from '../qmp/commands.js';
import type { CopyTarget, Undo } from './frozenView.js';
import { OUR_PREFIX } from './guestPath.js';
import type { QmpClient } from '../qmp/QmpClient.js';

const EXPORT_NAME = 'copies';
/** `vhdvault-direct-<pid>-<random>`: the folder of one run's socket. */
const SOCKET_DIR_PREFIX = `${OUR_PREFIX}direct-`;

export class DirectTarget implements CopyTarget {
  private constructor(
    private readonly server: NbdServer,
    private readonly dir: string,
    readonly store: CopyStore,
  ) {}

  static async start(store: CopyStore, log: (message: string) => void): Promise<DirectTarget> {
    const dir = await processTempDir(SOCKET_DIR_PREFIX);
    const catalog: ExportCatalog = {
      list: async () => [{ name: EXPORT_NAME, description: 'clusters QEMU copies before guest writes' }],
      open: async (name) => (name === EXPORT_NAME ? store : null),
      close: async () => {},
    };
    const server = new NbdServer(catalog, { log, maxConnections: 4 });
    try {
      await server.listen({ path: join(dir, 'copies.sock') });
    } catch (err) {
      await rm(dir, { recursive: true, force: true });
      throw err;
    }
    return new DirectTarget(server, dir, store);
  }

  async add(qmp: QmpClient, name: string): Promise<Undo> {
    // reconnect-delay 0 (the default): if we die, QEMU's copies fail at once and the snapshot breaks, never the guest.
    await blockdevAdd(qmp, { driver: 'nbd', 'node-name': name, server: { type: 'unix', path: join(this.dir, 'copies.sock') }, export: EXPORT_NAME });
    return () => blockdevDel(qmp, name);
  }

  /** After QEMU let go of the node: stop serving, delete the copies. */
  async stop(): Promise<void> {
    try {
      await this.server.stop();
    } finally {
      await rm(this.dir, { recursive: true, force: true });
      await this.store.remove();
    }
  }
}

/** Socket folders of direct-mode runs that were killed (their process is gone): removed by any live backup, whatever its mode. */
export const removeStaleSocketDirs = (): Promise<void> => removeDeadProcessDirs(SOCKET_DIR_PREFIX);
