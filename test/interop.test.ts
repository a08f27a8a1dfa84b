import { execFileSync } from 'node:child_process';
import { open, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { vhdvault } from './helpers/cli.js';
import { makeRaw, sameBytes, tempDir } from './helpers/files.js';
import { hasQemuImg, qemuImg, qemuInfo } from './helpers/qemu.js';
import { createDynamicVhd } from '../src/vhd/create.js';
import { VhdFile } from '../src/vhd/VhdFile.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

const dir = await tempDir();

describe.skipIf(!hasQemuImg)('qemu-img reads what we write, exactly', () => {
  const cases: Array<{ name: string; size: number; extents: Array<[number, number]> }> = [
    { name: '1 MiB', size: MiB, extents: [[0, 4096], [MiB - 512, 512]] },
    { name: '2 MiB', size: 2 * MiB, extents: [[0, 2 * MiB]] },
    {
      name: '37 MiB + 1536 bytes',
      size: 37 * MiB + 1536,
      extents: [[512, 3 * MiB], [20 * MiB + 7 * 512, 65536], [37 * MiB, 1536]],
    },
    {
      name: '5 GiB, mostly sparse',
      size: 5 * GiB,
      extents: [[0, MiB], [3 * GiB + 12345 * 512, 300 * 1024], [5 * GiB - 4096, 4096]],
    },
  ];

  for (const c of cases) {
    it(`raw → our VHD → qemu-img raw is identical (${c.name})`, async () => {
      const raw = join(dir, `${c.size}.raw`);
      const vhd = join(dir, `${c.size}.vhd`);
      const back = join(dir, `${c.size}.qemu.raw`);
      await makeRaw(raw, c.size, c.extents);

      const r = vhdvault('vhd', 'convert', raw, vhd);
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);

      expect(qemuInfo(vhd)['virtual-size']).toBe(c.size);
      qemuImg('convert', '-f', 'vpc', '-O', 'raw', vhd, back);
      expect((await stat(back)).size).toBe(c.size);
      expect(await sameBytes(raw, back)).toBe(true);

      // Only blocks holding data are allocated.
      const info = JSON.parse(vhdvault('vhd', 'info', vhd, '--json').stdout);
      const touched = new Set<number>();
      for (const [offset, length] of c.extents) {
        for (let b = Math.floor(offset / (2 * MiB)); b <= Math.floor((offset + length - 1) / (2 * MiB)); b++) touched.add(b);
      }
      expect(info.allocatedBlocks).toBe(touched.size);
      expect(info.size).toBe(c.size);
    });
  }

  it('our raw output of our VHD is exact and sparse', async () => {
    const raw = join(dir, 'sparse-src.raw');
    const vhd = join(dir, 'sparse.vhd');
    const out = join(dir, 'sparse-out.raw');
    const size = 64 * MiB + 1536;
    await makeRaw(raw, size, [[10 * MiB, 4096]]);
    expect(vhdvault('vhd', 'convert', raw, vhd).code).toBe(0);
    expect(vhdvault('vhd', 'convert', vhd, out).code).toBe(0);
    const s = await stat(out);
    expect(s.size).toBe(size);
    expect(await sameBytes(raw, out)).toBe(true);
    // One 2 MiB block of data: far less than the 64 MiB apparent size is allocated.
    expect(s.blocks * 512).toBeLessThanOrEqual(4 * MiB);
  });

  it('fixed VHD output is read by qemu-img with the exact size', async () => {
    const raw = join(dir, 'fixed-src.raw');
    const vhd = join(dir, 'fixed.vhd');
    const back = join(dir, 'fixed-back.raw');
    const size = 37 * MiB + 1536;
    await makeRaw(raw, size, [[0, MiB], [37 * MiB, 1536]]);
    expect(vhdvault('vhd', 'convert', raw, vhd, '--format', 'fixed').code).toBe(0);
    expect((await stat(vhd)).size).toBe(size + 512);
    expect(qemuInfo(vhd)['virtual-size']).toBe(size);
    qemuImg('convert', '-f', 'vpc', '-O', 'raw', vhd, back);
    expect(await sameBytes(raw, back)).toBe(true);
    expect(JSON.parse(vhdvault('vhd', 'info', vhd, '--json').stdout).type).toBe('fixed');
  });

  it('an empty dynamic VHD from `vhd create` opens in qemu-img with the exact size', async () => {
    const vhd = join(dir, 'empty.vhd');
    const size = 37 * MiB + 1536;
    expect(vhdvault('vhd', 'create', vhd, '--size', String(size)).code).toBe(0);
    expect(qemuInfo(vhd)['virtual-size']).toBe(size);
    const back = join(dir, 'empty.raw');
    qemuImg('convert', '-f', 'vpc', '-O', 'raw', vhd, back);
    const fh = await open(back, 'r');
    const buf = Buffer.alloc(size);
    await fh.read(buf, 0, size, 0);
    await fh.close();
    expect(buf.equals(Buffer.alloc(size))).toBe(true); // every byte zero
  });

  for (const variant of [
    { name: 'dynamic', options: ['-o', 'subformat=dynamic'] },
    { name: 'fixed', options: ['-o', 'subformat=fixed'] },
    { name: 'dynamic with force_size', options: ['-o', 'subformat=dynamic,force_size=on'] },
  ]) {
    it(`we convert qemu-img's ${variant.name} VHD to raw exactly as qemu-img does`, async () => {
      const raw = join(dir, `q-${variant.name}.raw`);
      const vhd = join(dir, `q-${variant.name}.vhd`);
      const theirs = join(dir, `q-${variant.name}.theirs.raw`);
      const ours = join(dir, `q-${variant.name}.ours.raw`);
      await makeRaw(raw, 37 * MiB + 1536, [[0, 8192], [5 * MiB + 512, MiB], [37 * MiB, 1536]]);
      qemuImg('convert', '-f', 'raw', '-O', 'vpc', ...variant.options, raw, vhd);
      qemuImg('convert', '-f', 'vpc', '-O', 'raw', vhd, theirs);
      const r = vhdvault('vhd', 'convert', vhd, ours);
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      expect((await stat(ours)).size).toBe((await stat(theirs)).size);
      expect(await sameBytes(ours, theirs)).toBe(true);
      expect(vhdvault('vhd', 'check', vhd).code).toBe(0);
      expect(JSON.parse(vhdvault('vhd', 'info', vhd, '--json').stdout).size).toBe(qemuInfo(vhd)['virtual-size']);
    });
  }

  it('a 2040 GiB disk with a block stored past 1 TiB (BAT entry above 2^31 sectors) reads back', async () => {
    const vhd = join(dir, 'huge.vhd');
    const size = 2040 * GiB;
    await createDynamicVhd(vhd, { size });
    // Push the trailing footer past 1.5 TiB, as if earlier blocks filled the file.
    const fh = await open(vhd, 'r+');
    const { size: fileSize } = await fh.stat();
    const footer = Buffer.alloc(512);
    await fh.read(footer, 0, 512, fileSize - 512);
    const newEnd = 1536 * GiB;
    await fh.truncate(newEnd);
    await fh.write(footer, 0, 512, newEnd - 512);
    await fh.close();

    const lastBlock = size / (2 * MiB) - 1;
    const data = Buffer.alloc(2 * MiB, 0xab);
    const w = await VhdFile.open(vhd, { writable: true });
    await w.writeBlock(lastBlock, data);
    await w.close();

    const r = await VhdFile.open(vhd);
    expect(r.header!.maxTableEntries).toBe(lastBlock + 1);
    const stored = await r.readBlock(lastBlock);
    await r.close();
    expect(stored!.data.equals(data)).toBe(true);
    expect(vhdvault('vhd', 'check', vhd).code).toBe(0);

    expect(qemuInfo(vhd)['virtual-size']).toBe(size);
    const io = execFileSync('qemu-io', ['-f', 'vpc', '-r', '-c', `read -P 0xab ${size - 2 * MiB} ${2 * MiB}`, vhd], { encoding: 'utf8' });
    expect(io).not.toMatch(/Pattern verification failed/);
    expect(io).toMatch(/read 2097152\/2097152 bytes/);
  });

  it('refuses sizes above 2040 GiB', async () => {
    const r = vhdvault('vhd', 'create', join(dir, 'too-big.vhd'), '--size', '2041G');
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/2040 GiB/);
    expect((await readdir(dir)).filter((f) => f.includes('too-big'))).toEqual([]);
  });
});
