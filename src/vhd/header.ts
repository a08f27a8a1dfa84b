import { vhdChecksum } from './checksum.js';
import { BAT_OFFSET, HEADER_COOKIE, HEADER_SIZE, HEADER_VERSION, MAX_BLOCK_SIZE, MAX_TABLE_ENTRIES, NO_OFFSET, SECTOR_SIZE } from './constants.js';
import { VaultError } from '../util/errors.js';
import { type ParentLocator, PLATFORM_NONE } from './parentLocator.js';
import { NIL_UUID, uuidFromBytes, uuidToBytes } from './uuid.js';

const CHECKSUM_OFFSET = 36;
const PARENT_NAME_OFFSET = 64;
const PARENT_NAME_SIZE = 512;
const LOCATORS_OFFSET = 576;
const LOCATOR_SIZE = 24;
export const LOCATOR_COUNT = 8;

export interface DynamicHeader {
  tableOffset: number;
  headerVersion: number;
  maxTableEntries: number;
  blockSize: number;
  parentUuid: string;
  parentTimestamp: number;
  parentName: string;
  /** Eight slots; unused ones have platform code `\0\0\0\0`. */
  parentLocators: ParentLocator[];
}

export function emptyLocator(): ParentLocator {
  return { platformCode: PLATFORM_NONE, dataSpace: 0, dataLength: 0, dataOffset: 0 };
}

export function newHeader(maxTableEntries: number, blockSize: number): DynamicHeader {
  return {
    tableOffset: BAT_OFFSET,
    headerVersion: HEADER_VERSION,
    maxTableEntries,
    blockSize,
    parentUuid: NIL_UUID,
    parentTimestamp: 0,
    parentName: '',
    parentLocators: Array.from({ length: LOCATOR_COUNT }, emptyLocator),
  };
}

export function serializeHeader(h: DynamicHeader): Buffer {
  const b = Buffer.alloc(HEADER_SIZE);
  b.write(HEADER_COOKIE, 0, 'latin1');
  b.writeBigUInt64BE(NO_OFFSET, 8);
  b.writeBigUInt64BE(BigInt(h.tableOffset), 16);
  b.writeUInt32BE(h.headerVersion, 24);
  b.writeUInt32BE(h.maxTableEntries, 28);
  b.writeUInt32BE(h.blockSize, 32);
  uuidToBytes(h.parentUuid).copy(b, 40);
  b.writeUInt32BE(h.parentTimestamp, 56);
  const name = Buffer.from(h.parentName, 'utf16le').swap16(); // UTF-16BE
  name.copy(b, PARENT_NAME_OFFSET, 0, Math.min(name.length, PARENT_NAME_SIZE));
  h.parentLocators.forEach((loc, i) => {
    const at = LOCATORS_OFFSET + i * LOCATOR_SIZE;
    b.write(loc.platformCode.padEnd(4, '\0').slice(0, 4), at, 'latin1');
    // Data space in bytes, as Hyper-V writes it (docs/design/01-vhd-files.md §1.4).
    b.writeUInt32BE(loc.dataSpace, at + 4);
    b.writeUInt32BE(loc.dataLength, at + 8);
    b.writeBigUInt64BE(BigInt(loc.dataOffset), at + 16);
  });
  b.writeUInt32BE(vhdChecksum(b, CHECKSUM_OFFSET), CHECKSUM_OFFSET);
  return b;
}

export function parseHeader(buf: Buffer, file: string): DynamicHeader {
  if (buf.length < HEADER_SIZE) throw new VaultError(file, `dynamic header truncated (${buf.length} of ${HEADER_SIZE} bytes)`);
  const cookie = buf.toString('latin1', 0, 8);
  if (cookie !== HEADER_COOKIE) throw new VaultError(file, `dynamic header has bad cookie ${JSON.stringify(cookie)} (expected "cxsparse")`);
  const stored = buf.readUInt32BE(CHECKSUM_OFFSET);
  const computed = vhdChecksum(buf.subarray(0, HEADER_SIZE), CHECKSUM_OFFSET);
  if (stored !== computed) {
    throw new VaultError(file, `dynamic header has bad checksum 0x${stored.toString(16)} (computed 0x${computed.toString(16)})`);
  }
  const headerVersion = buf.readUInt32BE(24);
  if (headerVersion >>> 16 !== 1) throw new VaultError(file, `dynamic header has unsupported version 0x${headerVersion.toString(16)}`);
  const tableOffset = buf.readBigUInt64BE(16);
  if (tableOffset % BigInt(SECTOR_SIZE) !== 0n || tableOffset > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new VaultError(file, `dynamic header has invalid BAT offset ${tableOffset}`);
  }
  const blockSize = buf.readUInt32BE(32);
  // The ceiling keeps a hostile header from making us read gigabytes per block.
  if (blockSize < SECTOR_SIZE || blockSize > MAX_BLOCK_SIZE || (blockSize & (blockSize - 1)) !== 0) {
    throw new VaultError(file, `block size ${blockSize} is not a power of two from 512 bytes to 256 MiB`);
  }
  const maxTableEntries = buf.readUInt32BE(28);
  // Files and directories alike: a hostile header must not make us read a gigantic table.
  if (maxTableEntries > MAX_TABLE_ENTRIES) throw new VaultError(file, `block allocation table of ${maxTableEntries} entries is implausibly large`);
  const nameBytes = Buffer.from(buf.subarray(PARENT_NAME_OFFSET, PARENT_NAME_OFFSET + PARENT_NAME_SIZE)).swap16();
  const parentLocators: ParentLocator[] = [];
  for (let i = 0; i < LOCATOR_COUNT; i++) {
    const at = LOCATORS_OFFSET + i * LOCATOR_SIZE;
    const space = buf.readUInt32BE(at + 4);
    parentLocators.push({
      platformCode: buf.toString('latin1', at, at + 4),
      // Writers disagree on the unit: the spec says sectors, Hyper-V writes bytes.
      dataSpace: space < SECTOR_SIZE ? space * SECTOR_SIZE : space,
      dataLength: buf.readUInt32BE(at + 8),
      dataOffset: Number(buf.readBigUInt64BE(at + 16)),
    });
  }
  return {
    tableOffset: Number(tableOffset),
    headerVersion,
    maxTableEntries,
    blockSize,
    parentUuid: uuidFromBytes(buf.subarray(40, 56)),
    parentTimestamp: buf.readUInt32BE(56),
    parentName: nameBytes.toString('utf16le').replace(/\0+$/, ''),
    parentLocators,
  };
}
