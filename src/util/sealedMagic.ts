/**
 * The first bytes of every object an encrypted repository seals
 * (docs/design/12-encryption.md §12.1): `VVE`, then envelope format 1. Shared
 * so that code reading a sealed file without its key can say so, rather than
 * call it damaged.
 */
export const SEALED_MAGIC = Buffer.from([0x56, 0x56, 0x45, 0x01]);

export function looksSealed(bytes: Buffer): boolean {
  return bytes.length >= SEALED_MAGIC.length && bytes.subarray(0, SEALED_MAGIC.length).equals(SEALED_MAGIC);
}
