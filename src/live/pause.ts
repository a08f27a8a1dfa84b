/**
 * A VM paused around its backup's point in time, when its guest cannot be
 * frozen: a paused VM (QEMU's `stop`, libvirt's suspend) has every request in
 * flight completed and starts no new one, so all disks' points are set with
 * nothing written between them — crash-consistent together. It is resumed
 * always: on errors, after SIGINT or SIGTERM (held until then), and after a
 * kill -9 by the next VM backup, which a marker file tells (as quiesce.ts
 * does for a freeze).
 */
import { readFile, rm, writeFile } from 'node:fs/promises';
import { describeOwner, isOwnerGone, lockOwner, parseOwner } from '../util/owner.js';
import type { QmpClient } from '../qmp/QmpClient.js';
import { deferSignals, markerPath } from './quiesce.js';

/** How a VM is paused and resumed, and asked whether it runs. */
export interface Pausable {
  /** What names the VM from run to run (its QMP socket, or libvirt's URI and the domain's UUID). */
  key: string;
  running(): Promise<boolean>;
  /** Paused, and by nothing else than a pause (QEMU says why it stopped). */
  paused(): Promise<boolean>;
  pause(): Promise<void>;
  resume(): Promise<void>;
}

/** A QEMU VM through QMP. */
export function qmpPausable(qmp: QmpClient, key: string): Pausable {
  const status = () => qmp.execute<{ running: boolean; status: string }>('query-status');
  return {
    key,
    running: async () => (await status()).running,
    paused: async () => (await status()).status === 'paused',
    pause: () => qmp.execute('stop').then(() => undefined),
    resume: () => qmp.execute('cont').then(() => undefined),
  };
}

/** Run `fn` with the VM paused; resolves to how long it was (null: it was paused already, by someone else, and stays so). */
export async function whilePaused(vm: Pausable, fn: () => Promise<void>): Promise<number | null> {
  if (!(await vm.running())) {
    await fn();
    return null;
  }
  const marker = await markerPath(vm.key, 'paused');
  await writeFile(marker, JSON.stringify(lockOwner('backup')));
  const deferred = deferSignals();
  const started = performance.now();
  try {
    await vm.pause();
    try {
      await fn();
    } finally {
      await vm.resume();
    }
    return Math.round(performance.now() - started);
  } finally {
    await rm(marker, { force: true });
    deferred.release();
  }
}

/** A VM a killed vhdvault left paused (its marker names a process gone from here): resumed, and said. */
export async function resumeLeftoverPause(vm: Pausable, tell: (message: string) => void): Promise<void> {
  const marker = await markerPath(vm.key, 'paused');
  const text = await readFile(marker, 'utf8').catch(() => null);
  if (text === null) return;
  const owner = parseOwner(text);
  if (owner && !isOwnerGone(owner, lockOwner('backup'))) return;
  // Only the pause it made: a VM stopped for another reason (an I/O error, a migration) is not ours to resume.
  if (await vm.paused()) {
    await vm.resume();
    tell(`${vm.key}: resumed the VM, which ${owner ? describeOwner(owner) : 'a vhdvault'} left paused when it was killed`);
  }
  await rm(marker, { force: true });
}
