/**
 * VHD checksum: one's complement of the sum of all bytes of the structure,
 * the 4-byte checksum field itself counted as zero.
 */
export function vhdChecksum(structure: Buffer, checksumOffset: number): number {
  let sum = 0;
  for (let i = 0; i < structure.length; i++) {
    if (i >= checksumOffset && i < checksumOffset + 4) continue;
    sum += structure[i]!;
  }
  return ~sum >>> 0;
}
