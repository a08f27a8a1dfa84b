import { UsageError } from './errors.js';

const UNITS: Record<string, number> = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

/** "4096", "2M", "37.5M", "1GiB", "5g" → bytes (binary units). */
export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*$/.exec(text);
  if (!m) throw new UsageError(`"${text}" is not a size (bytes, or a number with K, M, G or T)`);
  const bytes = Number(m[1]) * UNITS[m[2]!.toUpperCase()]!;
  if (!Number.isSafeInteger(bytes)) throw new UsageError(`"${text}" is not a whole number of bytes`);
  return bytes;
}

/** A rate: a size per second ("20M", "20M/s"), more than zero. */
export function parseRate(text: string): number {
  const bytes = parseSize(text.replace(/\/s$/i, ''));
  if (bytes <= 0) throw new UsageError(`"${text}" is not a positive rate`);
  return bytes;
}

const SHOWN_UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'] as const;

/** Bytes for a person, in one style everywhere: `512 B`, `136.7 KiB`, `30.0 MiB` (binary units). */
export function formatBytes(bytes: number): string {
  let value = bytes;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < SHOWN_UNITS.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${Math.round(value)} B` : `${value.toFixed(1)} ${SHOWN_UNITS[unit]}`;
}
