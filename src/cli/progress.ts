import { createRequire } from 'node:module';
import { formatBytes } from '../util/sizes.js';
import { PROGRESS_LINES_ENV, progressLine } from '../util/progress.js';
import { Interrupted, reportInterrupt } from './run.js';

export interface Progress {
  update(done: number, total: number, bytes: number): void;
  stop(): void;
  /** Aborted (reason: Interrupted) on SIGINT/SIGTERM: a command waiting on something long gives up at once. */
  readonly signal: AbortSignal;
}

/** Before this much time has passed, a rate (and an ETA from it) says more about start-up than about the work. */
const SETTLED_SECONDS = 1;
/** A backup in a job run reports its progress at most this often (PROGRESS_LINES_ENV). */
const LINE_INTERVAL_MS = 250;

export interface ProgressFigures {
  done: number;
  total: number;
  bytes: number;
  /** Since the work began. */
  seconds: number;
}

/** What progress shows: the bytes so far, and the rate and ETA once they mean something ('…' before). */
export function progressFigures({ done, total, bytes, seconds }: ProgressFigures): { percent: string; bytes: string; rate: string; eta: string } {
  const settled = seconds >= SETTLED_SECONDS && done > 0;
  return {
    percent: total > 0 ? `${Math.floor((Math.min(done, total) / total) * 100)}%` : '…',
    bytes: formatBytes(bytes),
    rate: settled ? `${formatBytes(bytes / seconds)}/s` : '…',
    eta: settled ? formatEta((Math.max(0, total - done) * seconds) / done) : '…',
  };
}

/** `7s`, `3m 05s`, `2h 10m`. */
export function formatEta(seconds: number): string {
  const s = Math.round(seconds);
  const two = (n: number) => String(n).padStart(2, '0');
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${two(s % 60)}s`;
  return `${Math.floor(s / 3600)}h ${two(Math.floor((s % 3600) / 60))}m`;
}

/** One unit's progress on a line: `alpha 45% 120.0 MiB read, 80.0 MiB/s, ETA 3s` (rate and ETA once settled; `alpha …` before its first figures). */
export function describeProgress(label: string, figures: ProgressFigures, verb = 'read'): string {
  // Started, nothing known yet (the backup opens its source).
  if (figures.total === 0) return `${label} …`;
  const f = progressFigures(figures);
  return `${label} ${f.percent} ${f.bytes} ${verb}${f.rate === '…' ? '' : `, ${f.rate}, ETA ${f.eta}`}`;
}

/** cli-progress hides the cursor while it draws; this shows it again. */
const SHOW_CURSOR = '\x1b[?25h';
/** After a signal, how long the command may unwind through its abort paths (temp files removed) before it is cut short. */
const GRACE_MS = 3000;
const SIGNALS = ['SIGINT', 'SIGTERM'] as const;

/**
 * A progress bar on stderr (bytes, rate, ETA), only when stderr is a terminal and output is not JSON.
 * Either way, while the command runs, SIGINT/SIGTERM give the terminal back (bar ended, cursor shown)
 * and make the next update() throw Interrupted, so the command aborts the way it does on any error
 * (its temporary files removed: a job daemon stopping its backups leaves no partial one); one that
 * does not unwind within GRACE_MS exits anyway. Either way: `vhdvault: interrupted`, exit 128 + signal.
 */
export function progressBar(label: string, json: boolean, verb = 'read'): Progress {
  const bar = json || !process.stderr.isTTY ? null : newBar(label, verb);
  const lines = bar === null && process.env[PROGRESS_LINES_ENV] === '1';
  let lastLine = -Infinity;
  const started = performance.now();
  const interrupted = new AbortController();
  let listening = false;
  let shown = false;
  let signalled: NodeJS.Signals | null = null;
  const end = () => {
    if (listening) for (const signal of SIGNALS) process.off(signal, onSignal);
    listening = false;
    if (!shown) return;
    shown = false;
    bar!.stop();
    process.stderr.write(SHOW_CURSOR);
  };
  // Our listeners are gone once the command ends, so a second signal terminates at once.
  const onSignal = (signal: NodeJS.Signals) => {
    signalled = signal;
    end();
    interrupted.abort(new Interrupted(signal));
    setTimeout(() => process.exit(reportInterrupt(signal)), GRACE_MS).unref();
  };
  // From now on: a signal before the first update still stops the command cleanly.
  listening = true;
  for (const signal of SIGNALS) process.on(signal, onSignal);
  return {
    update(done, total, bytes) {
      if (signalled) throw new Interrupted(signalled);
      const now = performance.now();
      if (lines && (now - lastLine >= LINE_INTERVAL_MS || done === total)) {
        lastLine = now;
        process.stderr.write(progressLine(done, total, bytes));
      }
      if (!bar) return;
      const { eta, ...figures } = progressFigures({ done, total, bytes, seconds: (now - started) / 1000 });
      // cli-progress has an {eta} of its own (from its first instants too): ours is {left}.
      const payload = { ...figures, left: eta };
      if (!shown) {
        shown = true;
        bar.start(total, done, payload);
      } else bar.update(done, payload);
    },
    stop: end,
    signal: interrupted.signal,
  };
}

function newBar(label: string, verb: string): import('cli-progress').SingleBar {
  // Loaded only for a terminal: it costs ~45 ms at start-up, which scripts and the tests' hundreds of runs need not pay.
  const cliProgress = createRequire(import.meta.url)('cli-progress') as typeof import('cli-progress');
  return new cliProgress.SingleBar(
    {
      stream: process.stderr,
      format: `${label} [{bar}] {percentage}% | {bytes} ${verb} | {rate} | ETA {left}`,
      hideCursor: true,
    },
    cliProgress.Presets.shades_classic,
  );
}

/** How often the status line of a job run may be redrawn. */
const STATUS_INTERVAL_MS = 100;
const CLEAR_LINE = '\r\x1b[K';

export interface RunStatus {
  /** A line above the status line. */
  log(line: string): void;
  /** A unit's progress; null once it is done. */
  progress(unit: string, figures: { done: number; total: number; bytes: number } | null): void;
  stop(): void;
}

/**
 * `job run` on a terminal: one status line on stderr, redrawn, with each disk
 * (or VM) being backed up and how far it is; log lines go above it.
 */
export function runStatus(stream: NodeJS.WriteStream = process.stderr): RunStatus {
  const units = new Map<string, { started: number; done: number; total: number; bytes: number }>();
  let shown = false;
  let drawn = -Infinity;
  const clear = () => {
    if (shown) stream.write(CLEAR_LINE);
    shown = false;
  };
  const draw = () => {
    clear();
    drawn = performance.now();
    if (units.size === 0) return;
    const text = [...units].map(([unit, u]) => describeProgress(unit, { ...u, seconds: (drawn - u.started) / 1000 })).join(' | ');
    stream.write(text.slice(0, Math.max(10, (stream.columns || 80) - 1)));
    shown = true;
  };
  return {
    log(line) {
      clear();
      stream.write(`${line}\n`);
      draw();
    },
    progress(unit, figures) {
      const known = units.get(unit);
      if (figures === null) units.delete(unit);
      else units.set(unit, { started: known?.started ?? performance.now(), ...figures });
      if (!known || figures === null || figures.done === figures.total || performance.now() - drawn >= STATUS_INTERVAL_MS) draw();
    },
    stop: clear,
  };
}
