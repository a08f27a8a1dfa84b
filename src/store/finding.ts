/** A problem with one backup's structure, or with a file no backup accounts for. */
export interface Finding {
  disk: string;
  /** What is wrong, for callers that treat kinds differently (verify skips reading a backup whose data or parent is gone). */
  kind: 'metadata' | 'orphan' | 'pending' | 'missing-data' | 'missing-digests' | 'missing-parent' | 'structure';
  /** The backup concerned; null for files that belong to no listed backup. */
  id: string | null;
  problem: string;
}
