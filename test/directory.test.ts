import { randomBytes } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { cp, readFile, readdir, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { gzipSync } from 'node:zlib';
import { beforeAll, describe, expect, it } from 'vitest';
import { vhdvault } from './helpers/cli.js';
import { makeRaw, sameBytes, sha256, tempDir } from './helpers/files.js';
import { hasQemuImg, qemuImg, qemuInfo } from './helpers/qemu.js';
import { bitmapByteSize, setSector } from '../src/vhd/bitmap.js';
import { createDifferencingVhd, createDynamicVhd } from '../src/vhd/create.js';
import type { WritableVhdDisk } from '../src/vhd/disk.js';
import { openDisk } from '../src/vhd/openDisk.js';
import { synthesizeRaw, synthesizeVhd } from '../src/vhd/synthesize.js';
import { VhdChain } from '../src/vhd/VhdChain.js';
import { VhdDirectory } from '../src/vhd/VhdDirectory.js';

const MiB = 1024 * 1024;
const BLOCK = 2 * MiB;
const dir = await tempDir();

describe('raw ↔ directory round trips', () => {
  const raw = join(dir, 'src.raw');
  // 2 GiB + 10 MiB + 1536: more than 1000 blocks (so blocks/1/… is used), odd size.
  const size = 2048 * MiB + 10 * MiB + 1536;
  beforeAll(() => makeRaw(raw, size, [[0, 3 * MiB], [700 * MiB + 4096, 8192], [size - MiB - 1536, MiB + 1536]]));

  it('raw → dir → vhd → raw is byte-identical, and blocks sit at blocks/<id/1000>/<id%1000>', async () => {
    const d = join(dir, 'plain.vhd-dir');
    const vhd = join(dir, 'plain.vhd');
    const back = join(dir, 'plain.raw');
    expect(vhdvault('vhd', 'convert', raw, d).code).toBe(0);
    const lastBlock = Math.ceil(size / BLOCK) - 1;
    expect(lastBlock).toBeGreaterThan(1000);
    expect((await stat(join(d, 'blocks', String(Math.floor(lastBlock / 1000)), String(lastBlock % 1000)))).size).toBe(512 + BLOCK);
    expect((await readdir(d)).sort()).toEqual(['bat', 'blocks', 'footer', 'header']);
    expect(vhdvault('vhd', 'convert', d, vhd).code).toBe(0);
    expect(vhdvault('vhd', 'convert', vhd, back).code).toBe(0);
    expect(await sameBytes(back, raw)).toBe(true);
    if (hasQemuImg) expect(qemuInfo(vhd)['virtual-size']).toBe(size);
  });

  for (const codec of ['gzip', 'brotli'] as const) {
    it(`raw → dir (${codec}) → raw is byte-identical`, async () => {
      const d = join(dir, `${codec}.vhd-dir`);
      const back = join(dir, `${codec}.raw`);
      expect(vhdvault('vhd', 'convert', raw, d, '--compression', codec).code).toBe(0);
      expect(JSON.parse(await readFile(join(d, 'chunk-filters.json'), 'utf8'))).toEqual([codec]);
      // Every file is stored compressed: the footer file is not the raw 512 bytes.
      expect((await readFile(join(d, 'footer'))).subarray(0, 8).toString('latin1')).not.toBe('conectix');
      const info = JSON.parse(vhdvault('vhd', 'info', d, '--json').stdout);
      expect(info).toMatchObject({ type: 'dynamic', size, storage: 'directory', compression: codec, allocatedBlocks: 5 });
      expect(vhdvault('vhd', 'check', d).code).toBe(0);
      expect(vhdvault('vhd', 'convert', d, back).code).toBe(0);
      expect(await sameBytes(back, raw)).toBe(true);
    });
  }

  it('--compression is refused for file outputs (usage error)', () => {
    const r = vhdvault('vhd', 'convert', raw, join(dir, 'x.vhd'), '--compression', 'gzip');
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/directory/);
  });
});

/**
 * base.vhd (file) ← m1.vhd-dir (directory) ← m2.vhd (file) ← top.vhd-dir
 * (directory, gzip), with partial sector bitmaps in m2.
 */
describe('a 4-member chain mixing files and directories', () => {
  const SIZE = 11 * MiB + 1536;
  const model = Buffer.alloc(SIZE);
  const path = (name: string) => join(dir, 'chain', name);

  async function write(disk: WritableVhdDisk & { writeSectors(o: number, b: Buffer): Promise<void> }, offset: number, length: number) {
    const bytes = randomBytes(length);
    await disk.writeSectors(offset, bytes);
    bytes.copy(model, offset);
  }

  beforeAll(async () => {
    await rm(join(dir, 'chain'), { recursive: true, force: true });
    await import('node:fs/promises').then((fs) => fs.mkdir(join(dir, 'chain')));
    await createDynamicVhd(path('base.vhd'), { size: SIZE });
    const base = await openDisk(path('base.vhd'), { writable: true });
    await write(base, 0, 5 * MiB);
    await write(base, 10 * MiB, MiB + 1536);
    await base.close();

    await createDifferencingVhd(path('m1.vhd-dir'), path('base.vhd'), { layout: 'dir' });
    const m1 = await openDisk(path('m1.vhd-dir'), { writable: true });
    expect(m1).toBeInstanceOf(VhdDirectory);
    await write(m1, 6 * MiB, BLOCK); // a block absent below
    await write(m1, MiB + 4096, 4096); // sectors of block 0
    await m1.close();

    await createDifferencingVhd(path('m2.vhd'), path('m1.vhd-dir'));
    const m2 = await openDisk(path('m2.vhd'), { writable: true });
    // Partial bitmap: every third sector of block 2 present here, the rest from below.
    const bitmap = Buffer.alloc(bitmapByteSize(BLOCK));
    const data = randomBytes(BLOCK);
    for (let s = 0; s < BLOCK / 512; s += 3) {
      setSector(bitmap, s);
      data.copy(model, 2 * BLOCK + s * 512, s * 512, (s + 1) * 512);
    }
    await m2.writeBlock(2, data, bitmap);
    await write(m2, 3 * BLOCK + 512, 1024);
    await m2.close();

    await createDifferencingVhd(path('top.vhd-dir'), path('m2.vhd'), { layout: 'dir', compression: 'gzip' });
    const top = await openDisk(path('top.vhd-dir'), { writable: true });
    await write(top, 2 * BLOCK + 512 * 9, 512); // over a sector m2 does not hold
    await write(top, SIZE - 512, 512);
    await top.close();
  });

  it('check follows all four members; info lists the chain', () => {
    const check = vhdvault('vhd', 'check', path('top.vhd-dir'));
    expect(check.stderr).toBe('');
    expect(check.stdout).toMatch(/chain of 4 disks/);
    const info = JSON.parse(vhdvault('vhd', 'info', path('top.vhd-dir'), '--json').stdout);
    expect(info.chain.map((m: { storage: string }) => m.storage)).toEqual(['directory', 'file', 'directory', 'file']);
    expect(info.compression).toBe('gzip');
  });

  it('reads back the model through the chain', async () => {
    const chain = await VhdChain.open(path('top.vhd-dir'));
    const all = await chain.read(0, SIZE);
    await chain.close();
    expect(all.equals(model)).toBe(true);
  });

  it.skipIf(!hasQemuImg)('converts to a full VHD that qemu-img opens, equal to the model', async () => {
    const full = path('full.vhd');
    const back = path('full.raw');
    const r = vhdvault('vhd', 'convert', path('top.vhd-dir'), full);
    expect(r.stderr).toBe('');
    expect(qemuInfo(full)['virtual-size']).toBe(SIZE);
    qemuImg('convert', '-f', 'vpc', '-O', 'raw', full, back);
    expect((await readFile(back)).equals(model)).toBe(true);
  });

  it.skipIf(!hasQemuImg)('streams a synthesized VHD whose length is known up front', async () => {
    const chain = await VhdChain.open(path('top.vhd-dir'));
    const out = path('synth.vhd');
    const { length, stream } = synthesizeVhd(chain);
    await pipeline(stream, createWriteStream(out));
    await chain.close();
    expect((await stat(out)).size).toBe(length);
    // Blocks 0-2 and 5 are stored in base, 3 in m1; block 4 nowhere, so it is not emitted.
    expect(length).toBe(512 + 1024 + 512 + 5 * (512 + BLOCK) + 512);
    expect(qemuInfo(out)['virtual-size']).toBe(SIZE);
    qemuImg('convert', '-f', 'vpc', '-O', 'raw', out, path('synth.raw'));
    expect((await readFile(path('synth.raw'))).equals(model)).toBe(true);
    expect(vhdvault('vhd', 'check', out).code).toBe(0);
  });

  it('streams the raw image with its exact length', async () => {
    const chain = await VhdChain.open(path('top.vhd-dir'));
    const { length, stream } = synthesizeRaw(chain);
    const parts: Buffer[] = [];
    for await (const part of stream) parts.push(part as Buffer);
    await chain.close();
    expect(length).toBe(SIZE);
    expect(Buffer.concat(parts).equals(model)).toBe(true);
  });
});

describe('bad directories are refused with one clear line', () => {
  const good = join(dir, 'good.vhd-dir');
  beforeAll(async () => {
    const raw = join(dir, 'good.raw');
    await makeRaw(raw, 8 * MiB, [[0, MiB], [5 * MiB, 4096]]);
    expect(vhdvault('vhd', 'convert', raw, good).code).toBe(0);
  });

  async function damaged(name: string, damage: (d: string) => Promise<void>): Promise<string> {
    const d = join(dir, `${name}.vhd-dir`);
    await cp(good, d, { recursive: true });
    await damage(d);
    return d;
  }

  const cases: Array<[string, (d: string) => Promise<void>, RegExp]> = [
    ['missing footer', (d) => rm(join(d, 'footer')), /not a VHD directory \(it has no footer file\)/],
    ['block file of the wrong size', (d) => truncate(join(d, 'blocks/0/0'), 512 + BLOCK - 512), /block 0 \(blocks\/0\/0\) is \d+ bytes, expected/],
    ['bat claiming a missing block', (d) => rm(join(d, 'blocks/0/2')), /block 2 \(blocks\/0\/2\) is missing although the bat marks the block present/],
    ['garbage in chunk-filters.json', (d) => writeFile(join(d, 'chunk-filters.json'), '{"zstd'), /chunk-filters\.json.*not valid JSON/],
    ['unknown codec in chunk-filters.json', (d) => writeFile(join(d, 'chunk-filters.json'), '["zstd"]'), /chunk-filters\.json.*unsupported/],
    ['a gzip directory with a block that is not gzip', async (d) => {
      for (const f of ['footer', 'header', 'bat']) await writeFile(join(d, f), gzipSync(await readFile(join(d, f))));
      await writeFile(join(d, 'chunk-filters.json'), '["gzip"]');
      await writeFile(join(d, 'blocks/0/0'), gzipSync(await readFile(join(d, 'blocks/0/0'))));
      // blocks/0/2 left uncompressed
    }, /block 2 \(blocks\/0\/2\) cannot be decompressed as gzip/],
    ['a header claiming 4 Gi table entries (a bat decompression bomb must not be read)', async (d) => {
      const { serializeHeader } = await import('../src/vhd/header.js');
      const h = (await VhdDirectory.open(d)).header;
      await writeFile(join(d, 'header'), serializeHeader({ ...h, maxTableEntries: 0xffffffff }));
    }, /header.*table of 4294967295 entries is implausibly large/],
    ['bad header checksum', async (d) => {
      const h = await readFile(join(d, 'header'));
      h[100] = h[100]! ^ 0xff;
      await writeFile(join(d, 'header'), h);
    }, /header.*checksum/],
  ];

  for (const [name, damage, problem] of cases) {
    it(name, async () => {
      const d = await damaged(name.replace(/\W+/g, '-'), damage);
      const before = await readdir(d, { recursive: true });
      for (const args of [['check', d], ['convert', d, join(dir, `${name.replace(/\W+/g, '-')}.raw`)]]) {
        const r = vhdvault('vhd', ...args);
        expect(r.code, r.stderr).toBe(1);
        expect(r.stderr.trim().split('\n')).toHaveLength(1);
        expect(r.stderr).toContain(d);
        expect(r.stderr).toMatch(problem);
        expect(r.stderr).not.toContain('    at ');
      }
      expect(await readdir(d, { recursive: true })).toEqual(before);
      expect((await readdir(dir)).filter((f) => f.endsWith('.tmp'))).toEqual([]);
    });
  }

  it('the undamaged directory passes (the cases above are not vacuous)', () => {
    expect(vhdvault('vhd', 'check', good).code).toBe(0);
  });

  it("reads vhd-lib's oversized bat (one byte per table entry) the same", async () => {
    const d = await damaged('byte-bat', async (d) => {
      const bits = await readFile(join(d, 'bat'));
      const oversized = Buffer.alloc(4); // maxTableEntries = 4 for 8 MiB
      bits.copy(oversized);
      await writeFile(join(d, 'bat'), oversized);
    });
    const a = join(dir, 'byte-bat.raw');
    const b = join(dir, 'good-again.raw');
    expect(vhdvault('vhd', 'convert', d, a).code).toBe(0);
    expect(vhdvault('vhd', 'convert', good, b).code).toBe(0);
    expect(await sha256(a)).toBe(await sha256(b));
  });

  it('refuses a child larger than its parent', async () => {
    const small = join(dir, 'small.vhd');
    const big = join(dir, 'big.vhd-dir');
    await createDynamicVhd(small, { size: 4 * MiB });
    await createDifferencingVhd(big, small, { layout: 'dir' });
    // Grow the child's footer size beyond the parent's.
    const d = await VhdDirectory.open(big);
    const { serializeFooter } = await import('../src/vhd/footer.js');
    await writeFile(join(big, 'footer'), serializeFooter({ ...d.footer, currentSize: 6 * MiB }));
    const { serializeHeader } = await import('../src/vhd/header.js');
    await writeFile(join(big, 'header'), serializeHeader({ ...d.header, maxTableEntries: 3 }));
    const r = vhdvault('vhd', 'check', big);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/larger than its parent/);
  });
});
