/**
 * A backup whose source fails part-way leaves nothing staged behind (issue 20):
 * the failure waits for every block still in flight before the staged files go.
 */
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { AllocationFlag, Errno } from '../src/nbd/constants.js';
import { ExportError } from '../src/nbd/errors.js';
import type { ExportCatalog, NbdExport, ReadPiece } from '../src/nbd/export.js';
import { NbdServer } from '../src/nbd/NbdServer.js';
import type { Extent } from '../src/nbd/transmission.js';
import { SWEEP_MARKER } from '../src/store/layouts/blockObjects.js';
import { VaultError } from '../src/util/errors.js';
import { cleanUpAfter } from '../src/util/fsync.js';
import type { LayoutName } from '../src/store/metadata.js';
import { expectRefused, vhdvaultAsync } from './helpers/cli.js';
import { tempDir } from './helpers/files.js';
import { initRepo } from './helpers/store.js';

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;
/** Past a thousand blocks: the dir layout's block files go in a second folder (blocks/1/). */
const BLOCKS = 1002;
/** Its read fails; the blocks after it answer late, once the failure has been seen. */
const FAILING = 999;
const DATA = new Set([0, 1, 2, 3, FAILING, 1000, 1001]);
const LATE_MS = 300;

const blockOf = (offset: number) => Math.floor(offset / BLOCK);
const toBlockEnd = (offset: number, length: number) => Math.min(length, BLOCK - (offset % BLOCK));

/** A disk of a few data blocks, whose read of block FAILING fails (EIO) while the blocks after it are slow. */
const failingExport: NbdExport = {
  size: BLOCKS * BLOCK,
  writable: false,
  async read(offset, length): Promise<ReadPiece[]> {
    const block = blockOf(offset);
    if (block === FAILING) throw new ExportError(Errno.EIO, 'injected read failure');
    if (block > FAILING) await new Promise((r) => setTimeout(r, LATE_MS));
    return [{ offset, data: Buffer.alloc(length, (block % 250) + 1) }];
  },
  async allocation(offset, length): Promise<Extent[]> {
    const hole = DATA.has(blockOf(offset)) ? 0 : AllocationFlag.HOLE | AllocationFlag.ZERO;
    return [{ length: toBlockEnd(offset, length), flags: hole }];
  },
};

const catalog: ExportCatalog = {
  list: async () => [{ name: '', description: 'fails a read' }],
  open: async (name) => (name === '' ? failingExport : null),
  close: async () => undefined,
};

const dir = await tempDir('vhdvault-failed-');
const server = new NbdServer(catalog);
const uri = await server.listen({ path: join(dir, 'nbd.sock') });
afterAll(() => server.stop());

/** Names ending in .tmp anywhere below `folder`, but for the objects layout's sweep marker (left on purpose). */
async function stagedLeftovers(folder: string): Promise<string[]> {
  const entries = await readdir(folder, { recursive: true }).catch(() => []);
  return entries.filter((e) => e.split('/').some((part) => part.endsWith('.tmp') && !SWEEP_MARKER.test(part)));
}

describe('a backup from an NBD source that fails a read', () => {
  it.each<LayoutName>(['dir', 'vhd', 'objects'])('%s layout: fails with one line and leaves no staged file, every time', async (layout) => {
    const repo = join(dir, layout);
    await initRepo(repo, layout);
    for (let run = 0; run < 3; run++) {
      const r = await vhdvaultAsync('backup', repo, 'vm', '--source', uri);
      expectRefused(r, uri, /Input\/output error|EIO|injected/i);
      expect(await stagedLeftovers(join(repo, 'disks', 'vm')), `run ${run + 1}`).toEqual([]);
    }
  });
});

describe('a clean-up that fails after an error', () => {
  it('is reported after the error, which keeps its type', async () => {
    const left = () => Promise.reject(new VaultError('/r/disks/vm/..x.tmp', 'is left behind: it cannot be removed (permission denied); remove it by hand'));
    const err = await cleanUpAfter(new VaultError('nbd://h/x', 'read failed'), left);
    expect(err).toBeInstanceOf(VaultError);
    expect((err as Error).message).toBe('nbd://h/x: read failed; and /r/disks/vm/..x.tmp: is left behind: it cannot be removed (permission denied); remove it by hand');
    const original = new VaultError('nbd://h/x', 'read failed');
    expect(await cleanUpAfter(original, async () => undefined)).toBe(original);
  });
});
