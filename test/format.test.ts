import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { tempDir } from './helpers/files.js';
import { hasQemuImg, qemuImg } from './helpers/qemu.js';
import { parseSize } from '../src/util/sizes.js';
import { Bat } from '../src/vhd/bat.js';
import { bitmapByteSize, fullBitmap, isBitmapFull, isSectorSet, setSector } from '../src/vhd/bitmap.js';
import { newFooter, parseFooter, serializeFooter, virtualSize } from '../src/vhd/footer.js';
import { geometryForSize, geometrySectors, isMaxGeometry, specGeometry } from '../src/vhd/geometry.js';
import { newHeader, parseHeader, serializeHeader } from '../src/vhd/header.js';
import { fromVhdTimestamp, toVhdTimestamp } from '../src/vhd/timestamp.js';

const MiB = 1024 * 1024;
const dir = await tempDir();

describe('footer and header', () => {
  it('round-trip through their bytes with valid checksums', () => {
    const footer = newFooter('dynamic', 37 * MiB + 1536);
    const parsed = parseFooter(serializeFooter(footer), 'x.vhd');
    expect(parsed).toEqual(footer);
    const header = newHeader(19, 2 * MiB);
    header.parentName = '..\\dir\\parent ü.vhd';
    expect(parseHeader(serializeHeader(header), 'x.vhd')).toEqual(header);
  });

  it('size comes from CHS only for creators qemu sizes that way', () => {
    const footer = newFooter('dynamic', 37 * MiB + 1536);
    footer.geometry = specGeometry(footer.currentSize);
    expect(virtualSize(footer)).toBe(footer.currentSize);
    footer.creatorApp = 'qemu';
    expect(virtualSize(footer)).toBe(geometrySectors(footer.geometry) * 512);
    expect(virtualSize(footer)).toBeLessThan(footer.currentSize);
  });

  it('timestamps count seconds from 2000-01-01 UTC', () => {
    expect(toVhdTimestamp(new Date('2000-01-01T00:00:00Z'))).toBe(0);
    expect(toVhdTimestamp(new Date('2000-01-02T00:00:01Z'))).toBe(86401);
    expect(fromVhdTimestamp(86401).toISOString()).toBe('2000-01-02T00:00:01.000Z');
  });
});

describe('geometry', () => {
  it('uses the spec geometry when it is exact and the maximum otherwise', () => {
    // A size the spec's geometry describes exactly: the geometry of 4 GiB, taken back to bytes.
    const exact = geometrySectors(specGeometry(4096 * MiB)) * 512;
    expect(exact).not.toBe(4096 * MiB);
    const g = specGeometry(exact);
    expect(geometrySectors(g) * 512).toBe(exact);
    expect(isMaxGeometry(g)).toBe(false);
    expect(geometryForSize(exact)).toEqual(g);
    expect(isMaxGeometry(geometryForSize(37 * MiB + 1536))).toBe(true);
  });

  it.skipIf(!hasQemuImg)('matches the geometry qemu-img computes for the same sizes', async () => {
    for (const size of [MiB, 37 * MiB, 500 * MiB, 4 * 1024 * MiB, 130 * 1024 * MiB]) {
      const path = join(dir, `${size}.vhd`);
      qemuImg('create', '-q', '-f', 'vpc', path, String(size));
      const fh = await open(path, 'r');
      const buf = Buffer.alloc(512);
      await fh.read(buf, 0, 512, 0);
      await fh.close();
      const theirs = parseFooter(buf, path);
      // qemu rounds the size up to its geometry, so the geometry is exact for its size.
      expect(specGeometry(theirs.currentSize)).toEqual(theirs.geometry);
    }
  });
});

describe('BAT and bitmaps', () => {
  it('BAT entries are unsigned 32-bit and padded to a sector', () => {
    const bat = Bat.empty(130);
    expect(bat.toBuffer().length).toBe(1024);
    bat.set(7, 0x80000001);
    expect(bat.get(7)).toBe(0x80000001);
    expect(bat.get(8)).toBeUndefined();
    expect(bat.allocatedCount()).toBe(1);
  });

  it('bitmaps are most significant bit first', () => {
    const b = Buffer.alloc(bitmapByteSize(2 * MiB));
    expect(b.length).toBe(512);
    setSector(b, 0);
    setSector(b, 9);
    expect(b[0]).toBe(0x80);
    expect(b[1]).toBe(0x40);
    expect(isSectorSet(b, 9)).toBe(true);
    expect(isSectorSet(b, 10)).toBe(false);
    expect(isBitmapFull(fullBitmap(2 * MiB), 4096)).toBe(true);
    expect(isBitmapFull(b, 4096)).toBe(false);
  });
});

describe('sizes on the command line', () => {
  it('accepts bytes and binary suffixes', () => {
    expect(parseSize('4096')).toBe(4096);
    expect(parseSize('2M')).toBe(2 * MiB);
    expect(parseSize('1.5K')).toBe(1536);
    expect(parseSize('5G')).toBe(5 * 1024 * MiB);
    expect(parseSize('1T')).toBe(1024 ** 4);
    expect(parseSize('2MiB')).toBe(2 * MiB);
    expect(() => parseSize('banana')).toThrow(/not a size/);
    expect(() => parseSize('0.3K')).toThrow(/whole number/);
  });
});
