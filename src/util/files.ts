import type { Stats } from 'node:fs';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import pLimit from 'p-limit';

export async function pathExists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/**
 * Why a path of this kind cannot hold a disk image (opening a FIFO would block,
 * and none of these can be read at an offset), or null for files, folders and
 * block devices.
 */
export function notADiskImage(s: Stats): string | null {
  if (s.isFIFO()) return 'is a FIFO, not a disk image';
  if (s.isSocket()) return 'is a socket, not a disk image';
  if (s.isCharacterDevice()) return 'is a character device, not a disk image';
  return null;
}

/** Bytes the given files and directories occupy (directories: the sum of every file below them). */
export async function bytesUnder(paths: string[]): Promise<number> {
  let total = 0;
  for (const path of paths) {
    const s = await stat(path);
    if (!s.isDirectory()) {
      total += s.size;
      continue;
    }
    const files = (await readdir(path, { recursive: true, withFileTypes: true })).filter((e) => e.isFile());
    const limit = pLimit(16);
    const sizes = await Promise.all(files.map((e) => limit(async () => (await stat(join(e.parentPath, e.name))).size)));
    total += sizes.reduce((a, b) => a + b, 0);
  }
  return total;
}
