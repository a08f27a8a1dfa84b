import { accessSync, constants } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';

const SECTOR = 512;

/** True when one byte can be read at `offset`. */
async function readableAt(fh: FileHandle, probe: Buffer, offset: number): Promise<boolean> {
  const { bytesRead } = await fh.read(probe, 0, 1, offset);
  return bytesRead === 1;
}

/**
 * Size in bytes of an open block device. fstat reports 0 for devices and Node
 * has no lseek(SEEK_END) nor ioctl, so probe: a read past the end returns 0
 * bytes. Doubling, then bisecting on 512-byte sectors: a few dozen tiny reads.
 */
export async function blockDeviceSize(fh: FileHandle): Promise<number> {
  const probe = Buffer.alloc(1);
  if (!(await readableAt(fh, probe, 0))) return 0;
  // Invariant: sector `low` is readable, sector `high` is not.
  let low = 0;
  let high = 1;
  while (await readableAt(fh, probe, high * SECTOR)) {
    low = high;
    high *= 2;
  }
  while (high - low > 1) {
    const mid = Math.floor((low + high) / 2);
    if (await readableAt(fh, probe, mid * SECTOR)) low = mid;
    else high = mid;
  }
  return high * SECTOR;
}

/** Whether this process may use KVM (/dev/kvm readable and writable); else QEMU runs the guest with TCG. */
export function kvmUsable(): boolean {
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}
