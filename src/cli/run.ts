import { CommanderError } from 'commander';
import { constants } from 'node:os';
import { describeFsError, UsageError, VaultError } from '../util/errors.js';
import { printJsonError } from './json.js';

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

/**
 * Map any error to one line on stderr and an exit code; stacks only with
 * VHDVAULT_DEBUG=1. With `json`, the same failure is also a JSON document on
 * stdout, so a script reading stdout always gets one.
 */
export function reportError(err: unknown, json = false): number {
  if (err instanceof ExitStatus) return err.code; // the command has printed its findings (as JSON, when asked)
  if (err instanceof CommanderError) {
    if (err.exitCode === 0) return EXIT_OK; // --help, --version
    if (json) printJsonError(err.message.replace(/^error: /, ''), EXIT_USAGE); // commander has printed its line
    return EXIT_USAGE;
  }
  if (err instanceof Interrupted) {
    const code = reportInterrupt(err.signal);
    if (json) printJsonError('interrupted', code);
    return code;
  }
  if (process.env.VHDVAULT_DEBUG === '1') console.error(err);
  const { message, code } = describeFailure(err);
  // A message of several problems (a job file's) is a line each.
  for (const line of message.split('\n')) console.error(`vhdvault: ${line}`);
  if (json) printJsonError(message, code);
  return code;
}

function describeFailure(err: unknown): { message: string; code: number } {
  if (err instanceof UsageError) return { message: err.message, code: EXIT_USAGE };
  if (err instanceof VaultError) return { message: err.message, code: EXIT_FAILURE };
  const fsError = err as NodeJS.ErrnoException;
  if (fsError?.code && fsError.path) return { message: `${fsError.path}: ${describeFsError(err)}`, code: EXIT_FAILURE };
  return { message: (err as Error)?.message ?? String(err), code: EXIT_FAILURE };
}
