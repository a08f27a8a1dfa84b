import { randomUUID } from 'node:crypto';

/** UUIDs are stored as their 16 bytes in the textual order (big-endian fields). */
export function uuidToBytes(uuid: string): Buffer {
  const hex = uuid.replace(/-/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new Error(`not a UUID: ${uuid}`);
  return Buffer.from(hex, 'hex');
}

export function uuidFromBytes(bytes: Buffer): string {
  const h = bytes.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}

export const NIL_UUID = '00000000-0000-0000-0000-000000000000';

export function newUuid(): string {
  return randomUUID();
}
