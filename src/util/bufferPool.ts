/**
 * Recycled large buffers. Allocating a fresh 2 MiB buffer per block costs page
 * faults and zeroing in the kernel (measured: most of convert's time on a VM);
 * readers take buffers here and a consumer that is done with one gives it back.
 * A buffer never given back is simply garbage collected.
 */
const MAX_FREE_PER_SIZE = 20;
/** Smaller buffers may be slices of Node's shared 8 KiB slab: never recycle those. */
const MIN_POOLED = 64 * 1024;
const free = new Map<number, Buffer[]>();

/** An uninitialised buffer of exactly `size` bytes, owning its whole ArrayBuffer. */
export function takeBuffer(size: number): Buffer {
  return free.get(size)?.pop() ?? Buffer.from(new ArrayBuffer(size));
}

/** Give back a buffer (or any view of one) obtained from takeBuffer; the caller must not use it again. */
export function releaseBuffer(view: Uint8Array): void {
  const ab = view.buffer;
  if (!(ab instanceof ArrayBuffer) || ab.byteLength < MIN_POOLED) return; // a detached buffer has length 0
  let list = free.get(ab.byteLength);
  if (!list) free.set(ab.byteLength, (list = []));
  if (list.length < MAX_FREE_PER_SIZE) list.push(Buffer.from(ab));
}
