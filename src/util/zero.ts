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

/**
 * The runs of `buf` that hold data, as [start, end) offsets, looked at in
 * granules of `granule` bytes: a granule of zeros splits a run. What is left out
 * needs no write in a new sparse file, where unwritten ranges read as zeros.
 */
export function* dataRuns(buf: Buffer, granule: number): Generator<[number, number]> {
  if (isAllZero(buf)) return;
  let start = -1;
  for (let at = 0; at < buf.length; at += granule) {
    const end = Math.min(buf.length, at + granule);
    const zero = isAllZero(buf.subarray(at, end));
    if (!zero && start < 0) start = at;
    if (zero && start >= 0) {
      yield [start, at];
      start = -1;
    }
  }
  if (start >= 0) yield [start, buf.length];
}
