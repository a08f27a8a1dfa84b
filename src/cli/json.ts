/**
 * What `--json` prints. Every document names its format and version in a
 * `format` field, `vhdvault-<what>/<n>`: a field added keeps the version, a
 * field renamed, removed or given another meaning bumps it, so a script can
 * refuse what it does not know instead of misreading it. docs/json.md
 * describes each one.
 */
import { JOB_HISTORY_FORMAT } from '../jobs/history.js';
import { RUN_REPORT_FORMAT } from '../jobs/runReport.js';
import { DASHBOARD_FORMAT } from '../web/format.js';

export const JSON_FORMATS = {
  backup: 'vhdvault-backup/1',
  list: 'vhdvault-list/1',
  verify: 'vhdvault-verify/1',
  prune: 'vhdvault-prune/1',
  benchStages: 'vhdvault-bench-stages/1',
  benchMerge: 'vhdvault-bench-merge/1',
  vhdInfo: 'vhdvault-vhd-info/1',
  serveReady: 'vhdvault-serve-ready/1',
  replicate: 'vhdvault-replicate/1',
  jobRun: RUN_REPORT_FORMAT,
  jobHistory: JOB_HISTORY_FORMAT,
  dashboard: DASHBOARD_FORMAT,
  jobCheck: 'vhdvault-job-check/1',
  daemonEvent: 'vhdvault-daemon-event/1',
  vmBackup: 'vhdvault-vm-backup/1',
  vmList: 'vhdvault-vm-list/1',
  vmRestore: 'vhdvault-vm-restore/1',
  vmBootCheck: 'vhdvault-vm-boot-check/1',
  keyList: 'vhdvault-key-list/1',
  error: 'vhdvault-error/1',
} as const;

export type JsonFormat = (typeof JSON_FORMATS)[keyof typeof JSON_FORMATS];

/** The document for `body`, its format first (a run report's own `format` is the same). */
export function jsonDocument(format: JsonFormat, body: object): Record<string, unknown> {
  const doc: Record<string, unknown> = { format, ...body };
  doc.format = format;
  return doc;
}

/** Print one document, indented: what a command prints once, at its end. */
export function printJson(format: JsonFormat, body: object): void {
  console.log(JSON.stringify(jsonDocument(format, body), null, 2));
}

/** Print one document on one line: a stream of events or a ready line, read line by line. */
export function printJsonLine(format: JsonFormat, body: object): void {
  console.log(JSON.stringify(jsonDocument(format, body)));
}

/** Whether the command line asks for JSON (before any `--`): then a failure is a JSON document on stdout too. */
export function wantsJson(args: string[]): boolean {
  const end = args.indexOf('--');
  return (end === -1 ? args : args.slice(0, end)).includes('--json');
}

/** A failure as a document: the one line stderr shows, and the exit code. */
export function printJsonError(message: string, code: number): void {
  printJsonLine(JSON_FORMATS.error, { error: { message, code } });
}
