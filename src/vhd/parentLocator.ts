/** Platform codes of the locators we read and write (both hold UTF-16LE paths). */
export const PLATFORM_W2RU = 'W2ru'; // relative path
export const PLATFORM_W2KU = 'W2ku'; // absolute path
export const PLATFORM_NONE = '\0\0\0\0';

/** Longest parent locator payload we read (a path; anything longer is hostile). */
export const MAX_LOCATOR_BYTES = 64 * 1024;

export interface ParentLocator {
  platformCode: string;
  /** Space reserved for the data, in bytes (normalised from sectors when needed). */
  dataSpace: number;
  dataLength: number;
  dataOffset: number;
}

/** Paths are stored the Windows way (backslashes); we read either separator. */
export function encodeLocatorPath(path: string): Buffer {
  return Buffer.from(path.replace(/\//g, '\\'), 'utf16le');
}

export function decodeLocatorPath(data: Buffer): string {
  return data
    .toString('utf16le')
    .replace(/\0+$/, '')
    .replace(/\\/g, '/');
}
