import { stat } from 'node:fs/promises';
import { describeFsError, VhdError } from './errors.js';
import { VhdDirectory } from './VhdDirectory.js';
import { type OpenOptions, VhdFile } from './VhdFile.js';

/** Open one VHD, stored as a file or as an exploded directory. */
export async function openDisk(path: string, options: OpenOptions = {}): Promise<VhdFile | VhdDirectory> {
  const s = await stat(path).catch((err: unknown) => {
    throw new VhdError(path, describeFsError(err));
  });
  return s.isDirectory() ? VhdDirectory.open(path, options) : VhdFile.open(path, options);
}

