import type { Stats } from 'node:fs';
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pLimit from 'p-limit';
import { processAlive } from './processes.js';

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

/**
 * A new private folder in `parent` (default the system's temporary folder), `<prefix><pid>-<random>`,
 * after removing those of `prefix` whose process is gone (a killed run's): what
 * a run keeps there is its own, and the next run clears what a kill left.
 */
export async function processTempDir(prefix: string, parent = tmpdir()): Promise<string> {
  await removeDeadProcessDirs(prefix, parent);
  return mkdtemp(join(parent, `${prefix}${process.pid}-`));
}

/** Remove the `<prefix><pid>-…` folders in `parent` whose process is gone. */
export async function removeDeadProcessDirs(prefix: string, parent = tmpdir()): Promise<void> {
  for (const name of await readdir(parent).catch(() => [] as string[])) {
    if (!name.startsWith(prefix)) continue;
    const pid = Number(/^(\d+)-/.exec(name.slice(prefix.length))?.[1] ?? NaN);
    if (Number.isSafeInteger(pid) && !processAlive(pid)) await rm(join(parent, name), { recursive: true, force: true });
  }
}
