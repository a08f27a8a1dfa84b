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
