import { CommanderError } from 'commander';
import { describeFsError, UsageError, VhdError } from '../vhd/errors.js';

export const EXIT_OK = 0;
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;

/** Thrown by a command that has already reported its findings and only needs to set the exit code. */
export class ExitStatus extends Error {
  constructor(readonly code: number) {
    super(`exit ${code}`);
  }
}

/** Map any error to one line on stderr and an exit code; stacks only with VHDVAULT_DEBUG=1. */
export function reportError(err: unknown): number {
  if (err instanceof ExitStatus) return err.code;
  if (err instanceof CommanderError) return err.exitCode === 0 ? EXIT_OK : EXIT_USAGE;
  if (process.env.VHDVAULT_DEBUG === '1') console.error(err);
  if (err instanceof UsageError) {
    console.error(`vhdvault: ${err.message}`);
    return EXIT_USAGE;
  }
  if (err instanceof VhdError) {
    console.error(`vhdvault: ${err.message}`);
    return EXIT_FAILURE;
  }
  const fsError = err as NodeJS.ErrnoException;
  if (fsError?.code && fsError.path) {
    console.error(`vhdvault: ${fsError.path}: ${describeFsError(err)}`);
    return EXIT_FAILURE;
  }
  console.error(`vhdvault: ${(err as Error)?.message ?? String(err)}`);
  return EXIT_FAILURE;
}
