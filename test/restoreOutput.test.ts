/**
 * What a restore (and `vhd convert` to raw) leaves in a new file: zeros stay
 * holes, inside a block as well as whole blocks, the bytes are the disk's,
 * and a restore killed at any moment leaves nothing under the final name.
 */
import { spawn } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { CLI, cliEnv, vhdvault, type CliResult } from './helpers/cli.js';
import { makeRaw, sha256, tempDir } from './helpers/files.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BLOCK = 2 * MiB;

const dir = await tempDir('vhdvault-restore-output-');
const repo = join(dir, 'repo');
const rawPath = join(dir, 'disk.raw');
/** Block 0 whole data; block 1 zeros but 4 KiB; block 2 zeros; block 3 data in its first 64 KiB. */
const EXTENTS: Array<[number, number]> = [
  [0, BLOCK],
  [BLOCK + MiB, 4 * KiB],
  [3 * BLOCK, 64 * KiB],
];
/** The data above, rounded up to whole 64 KiB runs; far less than the three blocks holding it. */
const DATA_BYTES = BLOCK + 64 * KiB + 64 * KiB;

function ok(r: CliResult): CliResult {
  expect(r.code, `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`).toBe(0);
  return r;
}

/** Bytes the filesystem allocated to `path`. */
async function allocated(path: string): Promise<number> {
  return (await stat(path)).blocks * 512;
}

beforeAll(async () => {
  await makeRaw(rawPath, 4 * BLOCK, EXTENTS);
  ok(vhdvault('init', repo, '--compression', 'none'));
  ok(vhdvault('backup', repo, 'vm', '--source', rawPath));
  ok(vhdvault('vhd', 'convert', rawPath, join(dir, 'disk.vhd')));
});

describe('a raw file output is sparse where the disk holds zeros', () => {
  it('restore: whole zero blocks and zero runs inside a block stay holes', async () => {
    const out = join(dir, 'restored.raw');
    ok(vhdvault('restore', repo, 'vm', out));
    expect(await sha256(out)).toBe(await sha256(rawPath));
    expect((await stat(out)).size).toBe(4 * BLOCK);
    // Written whole, blocks 0, 1 and 3 would take 6 MiB.
    expect(await allocated(out)).toBeLessThanOrEqual(DATA_BYTES);
  });

  it('vhd convert to raw: the same', async () => {
    const out = join(dir, 'converted.raw');
    ok(vhdvault('vhd', 'convert', join(dir, 'disk.vhd'), out));
    expect(await sha256(out)).toBe(await sha256(rawPath));
    expect(await allocated(out)).toBeLessThanOrEqual(DATA_BYTES);
  });
});

describe('a killed restore', () => {
  it('leaves no file under the final name, whenever it is killed', async () => {
    const big = join(dir, 'big.raw');
    await makeRaw(big, 64 * MiB, [[0, 64 * MiB]]);
    ok(vhdvault('backup', repo, 'big', '--source', big));
    const expected = await sha256(big);
    let killedBefore = 0;
    // From before the output is created to after it is complete: the delays cover the whole run.
    for (const delayMs of [50, 150, 250, 350, 500, 700, 1000, 1500]) {
      const out = join(dir, `killed-${delayMs}.raw`);
      const child = spawn(process.execPath, [CLI, 'restore', repo, 'big', out], { stdio: 'ignore', env: cliEnv() });
      const exited = new Promise((resolve) => child.on('exit', resolve));
      await new Promise((resolve) => setTimeout(resolve, delayMs));
      child.kill('SIGKILL');
      await exited;
      // Under its name only once renamed there, which comes after it is whole and synced.
      if (await stat(out).catch(() => null)) expect(await sha256(out), `${out}, killed at ${delayMs} ms`).toBe(expected);
      else killedBefore++;
    }
    // The delays are meant to kill some runs before the end: otherwise the test proves nothing.
    expect(killedBefore).toBeGreaterThan(0);
  }, 60_000);
});
