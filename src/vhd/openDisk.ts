import { stat } from 'node:fs/promises';
import { notADiskImage } from '../util/files.js';
import { isAliasName, resolveAlias } from './alias.js';
import { describeFsError, VaultError } from '../util/errors.js';
import { ForeignImageError, foreignFormat } from './imageFormat.js';
import { VhdDirectory } from './VhdDirectory.js';
import { type OpenOptions, VhdFile } from './VhdFile.js';
import type { ChunkSeal } from './chunkSeal.js';

/**
 * Open one VHD, stored as a file or as an exploded directory, or the one a
 * Xen Orchestra alias (`*.alias.vhd`) points to: the disk's path is then the target's.
 */
export async function openDisk(path: string, options: OpenOptions & { seal?: ChunkSeal } = {}): Promise<VhdFile | VhdDirectory> {
  const at = isAliasName(path) ? await resolveAlias(path) : path;
  const s = await stat(at).catch((err: unknown) => {
    throw new VaultError(at, describeFsError(err));
  });
  // Checked before opening: opening a FIFO would wait for a writer.
  const odd = notADiskImage(s);
  if (odd) throw new VaultError(at, odd);
  if (s.isDirectory()) return VhdDirectory.open(at, options);
  // Only a directory's files are sealed one by one (an encrypted repository has no VHD files).
  if (options.seal) throw new VaultError(at, 'is a VHD file, but a sealed VHD directory was expected');
  return VhdFile.open(at, options).catch(async (err: unknown) => {
    // Not a VHD: another format's image is named as such (its container is no disk).
    const foreign = await foreignFormat(at).catch(() => null);
    throw foreign ? new ForeignImageError(at, foreign, undefined) : err;
  });
}
