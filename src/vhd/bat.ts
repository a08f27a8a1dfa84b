import { BAT_UNUSED, MAX_BAT_SECTOR, SECTOR_SIZE } from './constants.js';

/** Bytes the BAT occupies on disk: 4 per entry, padded to a whole sector. */
export function batByteSize(entries: number): number {
  return Math.ceil((entries * 4) / SECTOR_SIZE) * SECTOR_SIZE;
}

/**
 * Block allocation table: one unsigned 32-bit big-endian sector offset per block,
 * 0xFFFFFFFF for "not allocated". Entries are unsigned: past 1 TiB they exceed 2^31.
 */
export class Bat {
  private constructor(
    readonly entries: number,
    private readonly buf: Buffer,
  ) {}

  static empty(entries: number): Bat {
    return new Bat(entries, Buffer.alloc(batByteSize(entries), 0xff));
  }

  static fromBuffer(entries: number, raw: Buffer): Bat {
    const buf = Buffer.alloc(batByteSize(entries), 0xff);
    raw.copy(buf, 0, 0, Math.min(raw.length, entries * 4));
    return new Bat(entries, buf);
  }

  /** Sector offset of the block's bitmap, or undefined when not allocated. */
  get(block: number): number | undefined {
    const v = this.buf.readUInt32BE(block * 4);
    return v === BAT_UNUSED ? undefined : v;
  }

  set(block: number, sector: number | undefined): void {
    if (sector !== undefined && sector > MAX_BAT_SECTOR) throw new RangeError(`block ${block} would start at sector ${sector}, past what a VHD table can address`);
    this.buf.writeUInt32BE(sector === undefined ? BAT_UNUSED : sector, block * 4);
  }

  isAllocated(block: number): boolean {
    return this.get(block) !== undefined;
  }

  allocatedCount(): number {
    let n = 0;
    for (let i = 0; i < this.entries; i++) if (this.isAllocated(i)) n++;
    return n;
  }

  /** On-disk bytes, padded to a sector. */
  toBuffer(): Buffer {
    return this.buf;
  }

  /** The 512-byte sector of the table that holds `block`'s entry, and its file offset relative to the table. */
  sectorOf(block: number): { data: Buffer; offset: number } {
    const offset = Math.floor((block * 4) / SECTOR_SIZE) * SECTOR_SIZE;
    return { data: this.buf.subarray(offset, offset + SECTOR_SIZE), offset };
  }
}
