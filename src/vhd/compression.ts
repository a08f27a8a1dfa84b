import { promisify } from 'node:util';
import zlib from 'node:zlib';

export const COMPRESSIONS = ['none', 'gzip', 'brotli'] as const;
export type Compression = (typeof COMPRESSIONS)[number];

const gzip = promisify(zlib.gzip);
const gunzip = promisify(zlib.gunzip);
const brotliCompress = promisify(zlib.brotliCompress);
const brotliDecompress = promisify(zlib.brotliDecompress);

/**
 * Compress as Xen Orchestra's directory writer does: gzip at best speed,
 * brotli at minimum quality (both favour throughput; blocks are 2 MiB).
 */
export async function compress(codec: Compression, data: Buffer): Promise<Buffer> {
  switch (codec) {
    case 'none':
      return data;
    case 'gzip':
      return gzip(data, { level: zlib.constants.Z_BEST_SPEED });
    case 'brotli':
      return brotliCompress(data, {
        params: {
          [zlib.constants.BROTLI_PARAM_QUALITY]: zlib.constants.BROTLI_MIN_QUALITY,
          [zlib.constants.BROTLI_PARAM_SIZE_HINT]: data.length,
        },
      });
  }
}

/**
 * Decompress, refusing output longer than `maxLength` (a hostile file cannot
 * make us inflate gigabytes). Throws zlib's error on corrupt input.
 */
export async function decompress(codec: Compression, data: Buffer, maxLength: number): Promise<Buffer> {
  switch (codec) {
    case 'none':
      return data;
    case 'gzip':
      return gunzip(data, { maxOutputLength: maxLength });
    case 'brotli':
      return brotliDecompress(data, { maxOutputLength: maxLength });
  }
}

export function isCompression(value: unknown): value is Compression {
  return typeof value === 'string' && (COMPRESSIONS as readonly string[]).includes(value);
}
