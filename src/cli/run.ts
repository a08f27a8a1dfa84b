import { CommanderError } from 'commander';
import { constants } from 'node:os';
import { describeFsError, UsageError, VaultError } from '../util/errors.js';

export const EXIT_OK = 0;
export const EXIT_FAILURE = 1;
export const EXIT_USAGE = 2;

/** Thrown by a command that has already reported its findings and only needs to set the exit code. */
export class ExitStatus extends Error {
  constructor(readonly code: number) {
    super(`exit ${code}`);
  }
}

/** A command cut short by SIGINT or SIGTERM (see progress.ts); exits 128 + the signal's number, as shells do. */
export class Interrupted extends Error {
  constructor(readonly signal: NodeJS.Signals) {
    super('interrupted');
  }

  get code(): number {
    return 128 + (constants.signals[this.signal] ?? 0);
  }
}

let interruptReported = false;

/** The one "interrupted" line, printed once whether the command unwound or was cut short; returns the exit code. */
export function reportInterrupt(signal: NodeJS.Signals): number {
  if (!interruptReported) console.error('vhdvault: interrupted');
  interruptReported = true;
  return new Interrupted(signal).code;
}

/** Map any error to one line on stderr and an exit code; stacks only with VHDVAULT_DEBUG=1. */
export function reportError(err: unknown): number {
  if (err instanceof ExitStatus) return err.code;
  if (err instanceof CommanderError) return err.exitCode === 0 ? EXIT_OK : EXIT_USAGE;
  if (err instanceof Interrupted) return reportInterrupt(err.signal);
  if (process.env.VHDVAULT_DEBUG === '1') console.error(err);
  // A message of several problems (a job file's) is a line each.
  const eachLine = (message: string) => message.split('\n').forEach((line) => console.error(`vhdvault: ${line}`));
  if (err instanceof UsageError) {
    eachLine(err.message);
    return EXIT_USAGE;
  }
  if (err instanceof VaultError) {
    eachLine(err.message);
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
