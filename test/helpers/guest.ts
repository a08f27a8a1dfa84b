/**
 * The real Linux guest for test files (src/demo/guest.ts, which `npm start`
 * and the bench boot too): everything it exports, with every guest a file
 * booted killed, and its folder removed, after the file. Outside CI the tests
 * that need it are skipped, with the reason in their title, when a package is
 * missing; under CI (which installs them) a missing package is an error.
 */
import { join } from 'node:path';
import { afterAll, expect } from 'vitest';
import { vhdvaultAsync } from './cli.js';
import { e2fsck, ext4Cat, guestMissing, replayJournal, stopGuests } from '../../src/demo/guest.js';

export * from '../../src/demo/guest.js';

if (guestMissing !== undefined && process.env.CI) throw new Error(`${guestMissing} (CI must install them: .ci/run)`);

/** Why the guest's tests are skipped here, or undefined. */
export const guestSkip = guestMissing;

/** A suite's title, with the reason when it is skipped. */
export const guestTitle = (name: string) => (guestSkip === undefined ? name : `${name} [skipped: ${guestSkip}]`);

// Registered when a test file imports this module (while vitest collects it), so it applies to the whole file.
afterAll(stopGuests);

/**
 * Each disk of a VM backup (`disks`: target → backup id of `<vm>.<target>`) restored raw into
 * `dir`: clean under e2fsck -fn (after a journal replay unless quiesced), and the writer's counter on it.
 */
export async function restoredCounters(repo: string, vm: string, disks: Record<string, string>, dir: string, quiesced: boolean): Promise<number[]> {
  const counters: number[] = [];
  for (const [target, id] of Object.entries(disks)) {
    const out = join(dir, `${vm}-${target}-${id}.raw`);
    const r = await vhdvaultAsync('restore', repo, `${vm}.${target}`, out, '--backup', id);
    expect(r.code, r.stderr).toBe(0);
    if (!quiesced) await replayJournal(out);
    const fsck = await e2fsck(out);
    expect(fsck.code, `${target}: ${fsck.output}`).toBe(0);
    counters.push(Number.parseInt(await ext4Cat(out, '/counter'), 10));
  }
  return counters;
}
