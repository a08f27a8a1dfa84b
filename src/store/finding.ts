import { VaultError } from '../util/errors.js';

/** A problem with one backup's structure, or with a file no backup accounts for. */
export interface Finding {
  disk: string;
  /** What is wrong, for callers that treat kinds differently (verify skips reading a backup whose data or parent is gone). */
  kind: 'metadata' | 'orphan' | 'pending' | 'missing-data' | 'missing-digests' | 'missing-parent' | 'structure';
  /** The backup concerned; null for files that belong to no listed backup. */
  id: string | null;
  problem: string;
}

/**
 * A problem with an object several backups may name (a block object of the
 * objects layout), said of the backup whose read found it. Verify reads each
 * such object once per run and reports it for every backup that names it:
 * `namedBy` says it of each of them, not of the first reader.
 */
export class SharedObjectError extends VaultError {
  constructor(
    file: string,
    readonly what: string,
    readonly backup: string,
  ) {
    super(file, `${what} (named by backup ${backup})`);
  }

  namedBy(backup: string): SharedObjectError {
    return new SharedObjectError(this.file, this.what, backup);
  }
}
