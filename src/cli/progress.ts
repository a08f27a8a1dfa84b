import { createRequire } from 'node:module';
import { Interrupted, reportInterrupt } from './run.js';

export interface Progress {
  update(done: number, total: number, bytes: number): void;
  stop(): void;
  /** Aborted (reason: Interrupted) on SIGINT/SIGTERM: a command waiting on something long gives up at once. */
  readonly signal: AbortSignal;
}

const mib = (bytes: number) => (bytes / 1048576).toFixed(0);

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
      if (!bar) return;
      const seconds = (performance.now() - started) / 1000;
      const payload = { mib: mib(bytes), rate: seconds > 0 ? mib(bytes / seconds) : '0' };
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
      format: `${label} [{bar}] {percentage}% | {mib} MiB ${verb} | {rate} MiB/s | ETA {eta_formatted}`,
      hideCursor: true,
      etaBuffer: 50,
    },
    cliProgress.Presets.shades_classic,
  );
}
