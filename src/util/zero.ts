const zeroBuffers = new Map<number, Buffer>();

/** True when every byte is zero (a memcmp against a cached zero buffer). */
export function isAllZero(buf: Buffer): boolean {
  let zeros = zeroBuffers.get(buf.length);
  if (zeros === undefined) {
    zeros = Buffer.alloc(buf.length);
    if (zeroBuffers.size < 8) zeroBuffers.set(buf.length, zeros);
  }
  return buf.equals(zeros);
}
