import { randomBytes } from 'node:crypto';
import { mkdir, open, readFile, rename, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { vhdvault } from './helpers/cli.js';
import { tempDir } from './helpers/files.js';
import { hasQemuImg, qemuImg, qemuInfo } from './helpers/qemu.js';
import { createDifferencingVhd, createDynamicVhd } from '../src/vhd/create.js';
import { VhdChain } from '../src/vhd/VhdChain.js';
import { VhdFile } from '../src/vhd/VhdFile.js';
import { bitmapByteSize, setSector } from '../src/vhd/bitmap.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 9 * MiB + 1536; // not a multiple of the block size, nor CHS-aligned
const BLOCK = 2 * MiB;

/**
 * Three generations written through the API, mirrored into an in-memory model
 * of the disk as each generation sees it.
 */
const dir = await tempDir();

describe('a 3-deep differencing chain written through the API', () => {  const model = Buffer.alloc(SIZE);
  const paths = { base: '', mid: '', top: '' };

  async function write(vhd: VhdFile, offset: number, length: number): Promise<void> {
    const bytes = randomBytes(length);
    await vhd.writeSectors(offset, bytes);
    bytes.copy(model, offset);
  }

  beforeAll(async () => {
    paths.base = join(dir, 'base.vhd');
    paths.mid = join(dir, 'mid.vhd');
    paths.top = join(dir, 'top.vhd');

    await createDynamicVhd(paths.base, { size: SIZE });
    const base = await VhdFile.open(paths.base, { writable: true });
    await write(base, 0, 3 * MiB); // blocks 0-1
    await write(base, 6 * MiB, 3 * MiB + 1536); // blocks 3-4, to the very end
    await base.close();

    await createDifferencingVhd(paths.mid, paths.base);
    const mid = await VhdFile.open(paths.mid, { writable: true });
    await write(mid, 4096, 8192); // partial: a few sectors of block 0
    await write(mid, 2 * MiB + 512, 512); // one sector of block 1 (rest from base)
    await write(mid, 4 * MiB, BLOCK); // whole block 2, absent from base
    await mid.close();

    await createDifferencingVhd(paths.top, paths.mid);
    const top = await VhdFile.open(paths.top, { writable: true });
    await write(top, 0, 512); // first sector of block 0: above mid's and base's
    await write(top, 9 * MiB, 1536); // last sectors of the disk (block 4)
    // A block whose bitmap says "nothing here": every sector must come from below.
    const emptyBitmap = Buffer.alloc(bitmapByteSize(BLOCK));
    await top.writeBlock(3, Buffer.alloc(BLOCK, 0xee), emptyBitmap);
    // A block with alternate sectors present.
    const alternate = Buffer.alloc(bitmapByteSize(BLOCK));
    const data = randomBytes(BLOCK);
    for (let s = 0; s < BLOCK / 512; s += 2) {
      setSector(alternate, s);
      data.copy(model, 2 * MiB + s * 512, s * 512, (s + 1) * 512);
    }
    await top.writeBlock(1, data, alternate);
    await top.close();
  });

  it('reads back the model through VhdChain, block by block and by byte range', async () => {
    const chain = await VhdChain.open(paths.top);
    try {
      expect(chain.members.map((m) => m.footer.diskType)).toEqual(['differencing', 'differencing', 'dynamic']);
      expect(chain.size).toBe(SIZE);
      const all = await chain.read(0, SIZE);
      expect(all.equals(model)).toBe(true);
      const odd = await chain.read(2 * MiB - 1024, 5000 * 512);
      expect(odd.equals(model.subarray(2 * MiB - 1024, 2 * MiB - 1024 + 5000 * 512))).toBe(true);
    } finally {
      await chain.close();
    }
  });

  it('each member keeps its own generation', async () => {
    const midChain = await VhdChain.open(paths.mid);
    const baseChain = await VhdChain.open(paths.base);
    try {
      const midView = await midChain.read(0, SIZE);
      const baseView = await baseChain.read(0, SIZE);
      // The top wrote its first sector over mid's: mid must not see it.
      expect(midView.subarray(0, 512).equals(model.subarray(0, 512))).toBe(false);
      expect(baseView.subarray(4 * MiB, 6 * MiB).every((b) => b === 0)).toBe(true);
      expect(midView.subarray(4 * MiB, 6 * MiB).equals(model.subarray(4 * MiB, 6 * MiB))).toBe(true);
    } finally {
      await midChain.close();
      await baseChain.close();
    }
  });

  it('`vhd convert` flattens the chain to raw and to a VHD that qemu-img reads', async () => {
    const raw = join(dir, 'flat.raw');
    expect(vhdvault('vhd', 'convert', paths.top, raw).code).toBe(0);
    expect((await readFile(raw)).equals(model)).toBe(true);
    if (!hasQemuImg) return;
    const flat = join(dir, 'flat.vhd');
    const back = join(dir, 'flat-qemu.raw');
    expect(vhdvault('vhd', 'convert', paths.top, flat).code).toBe(0);
    expect(qemuInfo(flat)['virtual-size']).toBe(SIZE);
    qemuImg('convert', '-f', 'vpc', '-O', 'raw', flat, back);
    expect((await readFile(back)).equals(model)).toBe(true);
  });

  it('`vhd check` follows the chain; `vhd info` names the parent', async () => {
    const check = vhdvault('vhd', 'check', paths.top);
    expect(check.code).toBe(0);
    expect(check.stdout).toMatch(/chain of 3 disks/);
    const info = JSON.parse(vhdvault('vhd', 'info', paths.top, '--json').stdout);
    const midInfo = JSON.parse(vhdvault('vhd', 'info', paths.mid, '--json').stdout);
    expect(info.type).toBe('differencing');
    expect(info.parentUuid).toBe(midInfo.uuid);
    expect(info.parentLocators.map((l: { platform: string }) => l.platform)).toEqual(['W2ru', 'W2ku']);
  });

  it('still opens after the whole chain moves to another directory', async () => {
    const moved = join(dir, 'moved');
    await mkdir(moved);
    for (const name of ['base.vhd', 'mid.vhd', 'top.vhd']) await rename(join(dir, name), join(moved, name));
    try {
      const chain = await VhdChain.open(join(moved, 'top.vhd'));
      const all = await chain.read(0, SIZE);
      await chain.close();
      expect(all.equals(model)).toBe(true);
    } finally {
      for (const name of ['base.vhd', 'mid.vhd', 'top.vhd']) await rename(join(moved, name), join(dir, name));
    }
  });
});

describe('an append interrupted after its footer moved (a killed merge) leaves no dead space once resumed', () => {
  it('trimUnreferencedTail cuts the unreferenced block and keeps the file valid', async () => {
    const path = join(dir, 'tail.vhd');
    await createDynamicVhd(path, { size: 8 * MiB });
    const data = randomBytes(BLOCK);
    let vhd = await VhdFile.open(path, { writable: true });
    await vhd.writeBlock(1, data);
    await vhd.close();
    const { size: sound } = await stat(path);
    // What writeBlock's first step leaves when killed: the footer moved one stored block further.
    const footer = (await readFile(path)).subarray(sound - 512);
    const fh = await open(path, 'r+');
    await fh.write(footer, 0, 512, sound - 512 + bitmapByteSize(BLOCK) + BLOCK);
    await fh.close();
    expect(vhdvault('vhd', 'check', path).code).toBe(0); // valid, but 2 MiB of it is dead
    vhd = await VhdFile.open(path, { writable: true });
    await vhd.trimUnreferencedTail();
    await vhd.writeBlock(2, data); // appends where the dead block was
    await vhd.close();
    expect((await stat(path)).size).toBe(sound + bitmapByteSize(BLOCK) + BLOCK);
    expect(vhdvault('vhd', 'check', path).code).toBe(0);
    const back = await VhdFile.open(path);
    expect((await back.readBlock(1))!.data.equals(data)).toBe(true);
    expect((await back.readBlock(2))!.data.equals(data)).toBe(true);
    await back.close();
  });
});

describe('finding a parent', () => {
  it('passes over a candidate with the wrong UUID for the next locator that fits', async () => {
    const home = join(dir, 'parent-home');
    const moved = join(dir, 'parent-moved');
    await mkdir(home);
    await mkdir(moved);
    const base = join(home, 'base.vhd');
    await createDynamicVhd(base, { size: 4 * MiB });
    const writable = await VhdFile.open(base, { writable: true });
    const data = randomBytes(BLOCK);
    await writable.writeBlock(1, data);
    await writable.close();
    await createDifferencingVhd(join(home, 'child.vhd'), base);
    // The child moves away; beside it, a different disk named like its parent (relative locator).
    await rename(join(home, 'child.vhd'), join(moved, 'child.vhd'));
    await createDynamicVhd(join(moved, 'base.vhd'), { size: 4 * MiB });
    const chain = await VhdChain.open(join(moved, 'child.vhd'));
    expect(chain.members.map((m) => m.path)).toEqual([join(moved, 'child.vhd'), base]);
    expect((await chain.readBlock(1))!.equals(data)).toBe(true);
    await chain.close();
    // With the absolute one gone too, the wrong disk's UUID is the error.
    await rename(base, `${base}.gone`);
    const r = vhdvault('vhd', 'check', join(moved, 'child.vhd'));
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/has UUID .* expects/);
  });
});
