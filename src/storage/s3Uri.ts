import { UsageError } from '../util/errors.js';

/** S3's bucket naming rules, as far as they can be checked without asking the store. */
const BUCKET = /^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/;

export function isS3Uri(s: string): boolean {
  return s.startsWith('s3://');
}

/** `s3://bucket/some/prefix` → the bucket and the repository's prefix in it ('' for the whole bucket). */
export function parseS3Uri(uri: string): { bucket: string; prefix: string } {
  if (!isS3Uri(uri)) throw new UsageError(`${uri}: not an s3:// URI`);
  const rest = uri.slice('s3://'.length);
  const slash = rest.indexOf('/');
  const bucket = slash === -1 ? rest : rest.slice(0, slash);
  if (bucket === '') throw new UsageError(`${uri}: the bucket name is missing (s3://bucket/prefix)`);
  if (!BUCKET.test(bucket)) throw new UsageError(`${uri}: "${bucket}" is not a valid bucket name (3–63 lowercase letters, digits, dots and hyphens)`);
  const prefix = slash === -1 ? '' : rest.slice(slash + 1).replace(/^\/+|\/+$/g, '');
  if (prefix !== '') {
    for (const part of prefix.split('/')) {
      if (part === '' || part === '.' || part === '..' || part.includes('\0')) {
        throw new UsageError(`${uri}: the prefix may not contain ${part === '' ? 'empty parts (//)' : part.includes('\0') ? 'NUL characters' : `"${part}" parts`}`);
      }
    }
  }
  return { bucket, prefix };
}
