import { createHash } from 'node:crypto';
import { type Compression, isCompression } from '../vhd/compression.js';
import { DEFAULT_BLOCK_SIZE } from '../vhd/constants.js';
import { describeJsonError, VaultError } from '../util/errors.js';
import { type Cipher, isCipher } from '../crypto/aead.js';
import { isBackupId } from './names.js';

/** SHA-256 of each block, or in an encrypted repository its HMAC-SHA256 under the MAC key (digests.ts). */
export type DigestAlgorithm = 'sha256' | 'hmac-sha256';

/** `vhdvault.json`'s `encryption`: the cipher, and the repository's id (bound into every sealed object). */
export interface EncryptionConfig {
  cipher: Cipher;
  /** 16 random hex digits drawn at init: an object copied from another repository does not open here. */
  id: string;
}

/**
 * dir: exploded VHD directories; vhd: VHD files (both need a local folder);
 * objects: immutable block objects named by digest plus a block map per backup
 * (any storage). Each is a driver in layouts/.
 */
export type LayoutName = 'dir' | 'vhd' | 'objects';
export const LAYOUT_NAMES: readonly LayoutName[] = ['dir', 'vhd', 'objects'];

/** `vhdvault.json` at the repository's root. */
export interface RepositoryConfig {
  format: 'vhdvault-repository';
  version: 1;
  layout: LayoutName;
  compression: Compression;
  blockSize: number;
  createdAt: string;
  /** Present when the repository is encrypted (docs/design/12-encryption.md). */
  encryption?: EncryptionConfig;
}

/** `<id>.json`: one backup; its presence is what makes the backup exist. */
export interface BackupMetadata {
  format: 1;
  disk: string;
  id: string;
  kind: 'full' | 'delta';
  parent: string | null;
  createdAt: string;
  /** Virtual size in bytes. */
  size: number;
  blockSize: number;
  blockCount: number;
  layout: LayoutName;
  compression: Compression;
  /** The VHD's UUID (a child records it as its parent UUID). */
  uuid: string;
  blocksWritten: number;
  /** Bytes of block data this backup stored (after compression). */
  bytesWritten: number;
  /** Bytes the backup occupies: its VHD file or directory and its digests. */
  bytesStored: number;
  digestAlgorithm: DigestAlgorithm;
  /**
   * SHA-256 (hex) of the backup's digests object (in the objects layout its block
   * map), binding it to this backup: a map swapped for another's, or damaged, is
   * detected, and a cached copy is used only when it matches. Absent in backups
   * made before it was recorded.
   */
  digestsSha256?: string;
  /**
   * SHA-256 (hex) of the other fields as stored (metadataText): an edited field
   * (a lowered size, a changed digests SHA-256) is detected when the metadata is
   * read. Absent in backups made before it was recorded.
   */
  sealSha256?: string;
  /** Every stored block has a full sector bitmap (true for all vhdvault backups); lets merges rename blindly. */
  wholeBlocks?: boolean;
  /** A live backup's QEMU dirty bitmap, recording every write since this backup's point in time. */
  checkpoint?: Checkpoint;
}

/** A QEMU dirty bitmap by name, on the disk's format node. */
export interface Checkpoint {
  bitmap: string;
  node: string;
}

/** How metadata is stored: pretty JSON and a final newline. */
export const jsonText = (value: unknown): string => `${JSON.stringify(value, null, 2)}\n`;

/** How a backup's metadata is stored: its fields, sealed by their SHA-256 (sealSha256). */
export function metadataText(meta: BackupMetadata): string {
  return sealedText(meta);
}

/** A record's fields, then `sealSha256` over them: what backup metadata and VM records are stored as. */
export function sealedText<T extends { sealSha256?: string }>(record: T): string {
  const { sealSha256: _old, ...fields } = record;
  return jsonText({ ...fields, sealSha256: sealOf(fields) });
}

/** Whether a parsed record's fields still match its seal (true when it has none). */
export function sealHolds(record: { sealSha256?: unknown }): boolean {
  if (record.sealSha256 === undefined) return true;
  // The fields in their stored order: the seal is over the text they were written as.
  const { sealSha256, ...fields } = record;
  return sealOf(fields) === sealSha256;
}

function sealOf(fields: object): string {
  return createHash('sha256').update(jsonText(fields)).digest('hex');
}

export function parseJson(bytes: Buffer, where: string): unknown {
  const text = bytes.toString('utf8');
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new VaultError(where, `is not valid JSON (${describeJsonError(text, err)})`);
  }
}

export function parseConfig(value: unknown, path: string): RepositoryConfig {
  const v = value as Partial<RepositoryConfig> | null;
  if (!v || v.format !== 'vhdvault-repository') throw new VaultError(path, 'is not a vhdvault repository file');
  if (v.version !== 1) throw new VaultError(path, `repository format version ${String(v.version)} is not supported`);
  if (!LAYOUT_NAMES.includes(v.layout!)) throw new VaultError(path, `unknown layout ${JSON.stringify(v.layout)}`);
  if (!isCompression(v.compression)) throw new VaultError(path, `unknown compression ${JSON.stringify(v.compression)}`);
  if (v.blockSize !== DEFAULT_BLOCK_SIZE) throw new VaultError(path, `unsupported block size ${String(v.blockSize)}`);
  if (v.encryption !== undefined) {
    const e = v.encryption as Partial<EncryptionConfig> | null;
    if (!e || !isCipher(e.cipher)) throw new VaultError(path, `unknown cipher ${JSON.stringify(e?.cipher)}`);
    if (typeof e.id !== 'string' || !/^[0-9a-f]{16}$/.test(e.id)) throw new VaultError(path, 'encryption.id is not 16 hex digits');
  }
  return v as RepositoryConfig;
}

export function parseMetadata(value: unknown, path: string, disk: string, id: string): BackupMetadata {
  const m = value as Partial<BackupMetadata> | null;
  // A renamed disk folder: say so, rather than "not valid".
  if (m && typeof m.disk === 'string' && m.disk !== disk) throw new VaultError(path, `is the metadata of a backup of disk "${m.disk}", but it is in the folder of disk "${disk}" (was the folder renamed?)`);
  const ok =
    m !== null &&
    m.format === 1 &&
    m.disk === disk &&
    m.id === id &&
    (m.kind === 'full' || m.kind === 'delta') &&
    (m.parent === null || (typeof m.parent === 'string' && isBackupId(m.parent))) &&
    (m.kind === 'full') === (m.parent === null) &&
    Number.isSafeInteger(m.size) &&
    Number.isSafeInteger(m.blockCount) &&
    m.blockSize === DEFAULT_BLOCK_SIZE &&
    LAYOUT_NAMES.includes(m.layout!);
  if (!ok) throw new VaultError(path, 'is not valid backup metadata');
  if (!sealHolds(m)) throw new VaultError(path, 'has been edited or damaged: its fields no longer match the SHA-256 sealed in it');
  return m as BackupMetadata;
}
