/**
 * A VM paused around its backup's point in time, when its guest cannot be
 * frozen: QEMU's `stop` lets every request in flight complete and starts no
 * new one, so all disks' points are set with nothing written between them —
 * crash-consistent together. `cont` follows always: on errors, after SIGINT
 * or SIGTERM (held until then), and after a kill -9 by the next VM backup,
 * which a marker file tells (as quiesce.ts does for a freeze).
 */
import { readFile, rm, writeFile } from 'node:fs/promises';
import { describeOwner, isOwnerGone, lockOwner, parseOwner } from '../util/owner.js';
import type { QmpClient } from '../qmp/QmpClient.js';
import { deferSignals, markerPath } from './quiesce.js';

interface Status {
  running: boolean;
  status: string;
}

/** Run `fn` with the VM paused; resolves to how long it was (null: it was paused already, by someone else, and stays so). */
export async function whilePaused(qmp: QmpClient, vm: string, fn: () => Promise<void>): Promise<number | null> {
  if (!(await qmp.execute<Status>('query-status')).running) {
    await fn();
    return null;
  }
  const marker = await markerPath(vm, 'paused');
  await writeFile(marker, JSON.stringify(lockOwner('backup')));
  const deferred = deferSignals();
  const started = performance.now();
  try {
    await qmp.execute('stop');
    try {
      await fn();
    } finally {
      await qmp.execute('cont');
    }
    return Math.round(performance.now() - started);
  } finally {
    await rm(marker, { force: true });
    deferred.release();
  }
}

/** A VM a killed vhdvault left paused (its marker names a process gone from here): resumed, and said. */
export async function resumeLeftoverPause(qmp: QmpClient, vm: string, tell: (message: string) => void): Promise<void> {
  const marker = await markerPath(vm, 'paused');
  const text = await readFile(marker, 'utf8').catch(() => null);
  if (text === null) return;
  const owner = parseOwner(text);
  if (owner && !isOwnerGone(owner, lockOwner('backup'))) return;
  const status = await qmp.execute<Status>('query-status');
  // Only the pause it made: a VM paused for another reason (an error, a migration) is not ours to resume.
  if (status.status === 'paused') {
    await qmp.execute('cont');
    tell(`${vm}: resumed the VM, which ${owner ? describeOwner(owner) : 'a vhdvault'} left paused when it was killed`);
  }
  await rm(marker, { force: true });
}
