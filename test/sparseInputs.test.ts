/**
 * A sparse raw image's holes are known without being read: the file system's
 * map, through `qemu-img map`, names them, and they are never copied out of the
 * kernel as zeros. Without qemu-img every block is read, and the result is the
 * same bytes.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { open, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { openSource } from '../src/vhd/source.js';
import { CLI, cliEnv } from './helpers/cli.js';
import { tempDir } from './helpers/files.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const dir = await tempDir('vhdvault-sparse-');

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Pieces of data at these offsets, the rest holes; the file ends `size` bytes in. */
async function sparseFile(name: string, size: number, pieces: Array<[offset: number, length: number]>): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, '');
  const fh = await open(path, 'r+');
  try {
    await fh.truncate(size);
    for (const [offset, length] of pieces) await fh.write(Buffer.alloc(length, (offset / MiB) % 251 + 1), 0, length, offset);
  } finally {
    await fh.close();
  }
  return path;
}

// One piece inside block 3, one across the boundary of blocks 1000 and 1001, one in the file's last, partial, block.
const size = 64 * GiB - 3 * MiB + 512;
const pieces: Array<[number, number]> = [
  [3 * 2 * MiB + 4096, 64 * 1024],
  [1001 * 2 * MiB - MiB, 2 * MiB],
  [size - 4096, 4096],
];
const lastBlock = Math.ceil(size / (2 * MiB)) - 1;
const withData = [3, 1000, 1001, lastBlock];

describe('a sparse raw image of 64 GiB with 2 MiB of data', () => {
  it('reads its holes as null blocks and its data blocks whole, without reading the holes', async () => {
    const path = await sparseFile('big.raw', size, pieces);
    const source = await openSource(path, { fromRaw: true });
    try {
      const found: number[] = [];
      for (let b = 0; b < source.blockCount; b++) {
        const block = await source.readBlock(b);
        if (block === null) continue;
        found.push(b);
        const expected = Buffer.alloc(source.blockSize);
        for (const [offset, length] of pieces) {
          const from = Math.max(offset, b * source.blockSize);
          const to = Math.min(offset + length, (b + 1) * source.blockSize);
          if (from < to) expected.fill((offset / MiB) % 251 + 1, from - b * source.blockSize, to - b * source.blockSize);
        }
        expect(block.equals(expected), `block ${b}`).toBe(true);
      }
      expect(found).toEqual(withData);
    } finally {
      await source.close();
    }
  });

  it('converts to a VHD that qemu-img reads as the same disk', async () => {
    const path = join(dir, 'big.raw');
    const vhd = join(dir, 'big.vhd');
    const r = spawnSync(process.execPath, [CLI, 'vhd', 'convert', path, vhd, '--from', 'raw'], { encoding: 'utf8', env: cliEnv(), timeout: 60_000 });
    expect(r.status, r.stderr).toBe(0);
    execFileSync('qemu-img', ['compare', '-f', 'raw', '-F', 'vpc', path, vhd]);
    await rm(vhd);
  });
});

describe('without qemu-img on the PATH', () => {
  it('every block is read, and the VHD holds the same disk', async () => {
    const small = 64 * MiB + 512;
    const path = await sparseFile('small.raw', small, [[5 * MiB, 4096], [small - 512, 512]]);
    const vhd = join(dir, 'small.vhd');
    // Node itself is named by its full path: the PATH holds nothing at all.
    const r = spawnSync(process.execPath, [CLI, 'vhd', 'convert', path, vhd, '--from', 'raw'], { encoding: 'utf8', env: cliEnv({ PATH: join(dir, 'nothing-here') }), timeout: 60_000 });
    expect(r.status, r.stderr).toBe(0);
    execFileSync('qemu-img', ['compare', '-f', 'raw', '-F', 'vpc', path, vhd]);
  });
});
