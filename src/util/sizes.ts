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
