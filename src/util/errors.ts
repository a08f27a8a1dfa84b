/**
 * A problem with a named file: corrupt, hostile or unusable input.
 * The CLI prints `file: problem` on one line and exits 1.
 */
export class VaultError extends Error {
  constructor(
    readonly file: string,
    readonly problem: string,
  ) {
    super(`${file}: ${problem}`);
    this.name = 'VaultError';
  }
}

/** A request that makes no sense (bad size, bad flag value). The CLI exits 2. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

/** A short, human description of a failed open/read of `path` (ENOENT and friends). */
export function describeFsError(err: unknown): string {
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'ENOENT') return 'no such file or directory';
  if (code === 'EACCES' || code === 'EPERM') return 'permission denied';
  if (code === 'EISDIR') return 'is a directory';
  if (code === 'ENOTDIR') return 'a path component is not a directory';
  if (code === 'ENOSPC') return 'no space left on device';
  return (err as Error).message;
}

/**
 * Why JSON.parse refused a file's text, on one line and without quoting the
 * text itself (which may be anything: V8 quotes a piece of it, newlines and all).
 */
export function describeJsonError(text: string, err: unknown): string {
  if (text.trim() === '') return text.length === 0 ? 'it is empty' : 'it holds only white space';
  const why = (err as Error).message.replace(/, ".*" is not valid JSON$/s, '');
  return why.replace(/[\u0000-\u001f\u007f]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}
