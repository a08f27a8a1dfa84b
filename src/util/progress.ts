/** Reports work done so far: units done (blocks, or bytes where blocks are not the unit), their total, bytes moved. */
export type OnProgress = (done: number, total: number, bytes: number) => void;

/**
 * Set in the environment of a backup that a job run starts: the backup's
 * progress then goes to stderr as lines (PROGRESS_LINE), which the run reads
 * to show each disk's progress on its own terminal.
 */
export const PROGRESS_LINES_ENV = 'VHDVAULT_PROGRESS_LINES';
const PROGRESS_LINE = 'vhdvault-progress ';

export function progressLine(done: number, total: number, bytes: number): string {
  return `${PROGRESS_LINE}${done} ${total} ${bytes}\n`;
}

/** A line progressLine wrote, as [done, total, bytes]; null for any other line. */
export function parseProgressLine(line: string): [number, number, number] | null {
  if (!line.startsWith(PROGRESS_LINE)) return null;
  const figures = line.slice(PROGRESS_LINE.length).split(' ').map(Number);
  return figures.length === 3 && figures.every(Number.isFinite) ? (figures as [number, number, number]) : null;
}
