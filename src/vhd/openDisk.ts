import { stat } from 'node:fs/promises';
import { notADiskImage } from '../util/files.js';
import { isAliasName, resolveAlias } from './alias.js';
import { describeFsError, VaultError } from '../util/errors.js';
import { VhdDirectory } from './VhdDirectory.js';
import { type OpenOptions, VhdFile } from './VhdFile.js';

/**
 * Open one VHD, stored as a file or as an exploded directory, or the one a
 * Xen Orchestra alias (`*.alias.vhd`) points to: the disk's path is then the target's.
 */
export async function openDisk(path: string, options: OpenOptions = {}): Promise<VhdFile | VhdDirectory> {
  const at = isAliasName(path) ? await resolveAlias(path) : path;
  const s = await stat(at).catch((err: unknown) => {
    throw new VaultError(at, describeFsError(err));
  });
  // Checked before opening: opening a FIFO would wait for a writer.
  const odd = notADiskImage(s);
  if (odd) throw new VaultError(at, odd);
  return s.isDirectory() ? VhdDirectory.open(at, options) : VhdFile.open(at, options);
}
