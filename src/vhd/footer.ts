import { vhdChecksum } from './checksum.js';
import {
  CREATOR_APP,
  CREATOR_HOST_OS,
  CREATOR_VERSION,
  DiskType,
  type DiskTypeName,
  FOOTER_COOKIE,
  FOOTER_FEATURES,
  FOOTER_SIZE,
  FORMAT_VERSION,
  HEADER_OFFSET,
  MAX_DISK_SIZE,
  NO_OFFSET,
  SECTOR_SIZE,
} from './constants.js';
import { VaultError } from '../util/errors.js';
import { type Geometry, geometryForSize, geometrySectors, isMaxGeometry } from './geometry.js';
import { toVhdTimestamp } from './timestamp.js';
import { newUuid, uuidFromBytes, uuidToBytes } from './uuid.js';

const CHECKSUM_OFFSET = 64;

export interface Footer {
  features: number;
  formatVersion: number;
  /** Offset of the dynamic header; null for fixed disks (all-ones on disk). */
  dataOffset: number | null;
  timestamp: number;
  creatorApp: string;
  creatorVersion: number;
  creatorHostOs: string;
  originalSize: number;
  currentSize: number;
  geometry: Geometry;
  diskType: DiskTypeName;
  uuid: string;
  savedState: number;
}

export function newFooter(diskType: DiskTypeName, size: number, uuid = newUuid()): Footer {
  return {
    features: FOOTER_FEATURES,
    formatVersion: FORMAT_VERSION,
    dataOffset: diskType === 'fixed' ? null : HEADER_OFFSET,
    timestamp: toVhdTimestamp(new Date()),
    creatorApp: CREATOR_APP,
    creatorVersion: CREATOR_VERSION,
    creatorHostOs: CREATOR_HOST_OS,
    originalSize: size,
    currentSize: size,
    geometry: geometryForSize(size),
    diskType,
    uuid,
    savedState: 0,
  };
}

/** Creators whose footers qemu sizes by CHS geometry, in every version (docs/design/01-vhd-files.md §1.6). */
const CHS_SIZED_CREATORS = new Set(['vpc ', 'qemu']);

/**
 * The disk's virtual size as qemu computes it: CHS geometry for Virtual PC and
 * old qemu images unless the geometry is the maximum, else the current size.
 */
export function virtualSize(footer: Footer): number {
  if (CHS_SIZED_CREATORS.has(footer.creatorApp) && !isMaxGeometry(footer.geometry)) {
    return geometrySectors(footer.geometry) * SECTOR_SIZE;
  }
  return footer.currentSize;
}

export function serializeFooter(footer: Footer): Buffer {
  const b = Buffer.alloc(FOOTER_SIZE);
  b.write(FOOTER_COOKIE, 0, 'latin1');
  b.writeUInt32BE(footer.features, 8);
  b.writeUInt32BE(footer.formatVersion, 12);
  b.writeBigUInt64BE(footer.dataOffset === null ? NO_OFFSET : BigInt(footer.dataOffset), 16);
  b.writeUInt32BE(footer.timestamp, 24);
  b.write(footer.creatorApp.padEnd(4, '\0').slice(0, 4), 28, 'latin1');
  b.writeUInt32BE(footer.creatorVersion, 32);
  b.write(footer.creatorHostOs.padEnd(4, '\0').slice(0, 4), 36, 'latin1');
  b.writeBigUInt64BE(BigInt(footer.originalSize), 40);
  b.writeBigUInt64BE(BigInt(footer.currentSize), 48);
  b.writeUInt16BE(footer.geometry.cylinders, 56);
  b.writeUInt8(footer.geometry.heads, 58);
  b.writeUInt8(footer.geometry.sectorsPerTrack, 59);
  b.writeUInt32BE(DiskType[footer.diskType], 60);
  uuidToBytes(footer.uuid).copy(b, 68);
  b.writeUInt8(footer.savedState, 84);
  b.writeUInt32BE(vhdChecksum(b, CHECKSUM_OFFSET), CHECKSUM_OFFSET);
  return b;
}

function diskTypeName(code: number): DiskTypeName | undefined {
  for (const [name, value] of Object.entries(DiskType)) if (value === code) return name as DiskTypeName;
  return undefined;
}

function hex(n: number): string {
  return `0x${n.toString(16).padStart(8, '0')}`;
}

/** Parse and validate a footer; `where` names the copy ("footer", "footer copy at offset 0"). */
export function parseFooter(buf: Buffer, file: string, where = 'footer'): Footer {
  if (buf.length < FOOTER_SIZE) throw new VaultError(file, `${where} truncated (${buf.length} of ${FOOTER_SIZE} bytes)`);
  const cookie = buf.toString('latin1', 0, 8);
  if (cookie !== FOOTER_COOKIE) throw new VaultError(file, `${where} has bad cookie ${JSON.stringify(cookie)} (expected "conectix"): not a VHD`);
  const stored = buf.readUInt32BE(CHECKSUM_OFFSET);
  const computed = vhdChecksum(buf.subarray(0, FOOTER_SIZE), CHECKSUM_OFFSET);
  if (stored !== computed) throw new VaultError(file, `${where} has bad checksum ${hex(stored)} (computed ${hex(computed)})`);
  const formatVersion = buf.readUInt32BE(12);
  if (formatVersion >>> 16 !== 1) throw new VaultError(file, `${where} has unsupported format version ${hex(formatVersion)}`);
  const typeCode = buf.readUInt32BE(60);
  const diskType = diskTypeName(typeCode);
  if (diskType === undefined) throw new VaultError(file, `${where} has unsupported disk type ${typeCode}`);
  const rawOffset = buf.readBigUInt64BE(16);
  const currentSize = buf.readBigUInt64BE(48);
  if (currentSize > BigInt(MAX_DISK_SIZE)) {
    throw new VaultError(file, `${where} declares size ${currentSize} bytes, above the 2040 GiB maximum`);
  }
  if (currentSize % BigInt(SECTOR_SIZE) !== 0n) {
    throw new VaultError(file, `${where} declares size ${currentSize} bytes, not a whole number of 512-byte sectors`);
  }
  const footer: Footer = {
    features: buf.readUInt32BE(8),
    formatVersion,
    dataOffset: rawOffset === NO_OFFSET ? null : Number(rawOffset),
    timestamp: buf.readUInt32BE(24),
    creatorApp: buf.toString('latin1', 28, 32),
    creatorVersion: buf.readUInt32BE(32),
    creatorHostOs: buf.toString('latin1', 36, 40),
    originalSize: Number(buf.readBigUInt64BE(40)),
    currentSize: Number(currentSize),
    geometry: { cylinders: buf.readUInt16BE(56), heads: buf.readUInt8(58), sectorsPerTrack: buf.readUInt8(59) },
    diskType,
    uuid: uuidFromBytes(buf.subarray(68, 84)),
    savedState: buf.readUInt8(84),
  };
  if (diskType !== 'fixed' && (footer.dataOffset === null || footer.dataOffset % SECTOR_SIZE !== 0)) {
    throw new VaultError(file, `${where} has invalid header offset ${rawOffset} for a ${diskType} disk`);
  }
  return footer;
}
