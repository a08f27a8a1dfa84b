/** `vhdvault daemon --json` as a child process whose events a test waits for. */
import { type ChildProcess, spawn } from 'node:child_process';
import { CLI, cliEnv } from './cli.js';

export interface Event {
  time: string;
  event: string;
  job?: string;
  message: string;
}

const running = new Set<Daemon>();

/** For afterAll: no daemon outlives its test file. */
export function killDaemons(): void {
  for (const d of running) d.signal('SIGKILL');
}

/** A daemon of these job files (and any further options, e.g. --http), its events parsed as they come. */
export class Daemon {
  readonly events: Event[] = [];
  readonly exited: Promise<number | null>;
  stderr = '';
  private readonly child: ChildProcess;
  private waiters: Array<() => void> = [];

  constructor(...args: string[]) {
    this.child = spawn(process.execPath, [CLI, 'daemon', ...args, '--json'], { stdio: ['ignore', 'pipe', 'pipe'], env: cliEnv() });
    let buffered = '';
    this.child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      buffered += d;
      const lines = buffered.split('\n');
      buffered = lines.pop()!;
      for (const line of lines) this.events.push(JSON.parse(line) as Event);
      for (const w of this.waiters.splice(0)) w();
    });
    this.child.stderr!.setEncoding('utf8').on('data', (d: string) => (this.stderr += d));
    this.exited = new Promise((resolve) => this.child.once('exit', (code) => resolve(code)));
    running.add(this);
    void this.exited.then(() => running.delete(this));
  }

  /** Resolves with the first event from index `from` on that matches. */
  async waitFor(match: (e: Event) => boolean, from = 0, withinMs = 60_000): Promise<number> {
    const deadline = Date.now() + withinMs;
    for (;;) {
      const i = this.events.findIndex((e, k) => k >= from && match(e));
      if (i >= 0) return i;
      if (Date.now() > deadline) throw new Error(`no such daemon event within ${withinMs} ms; events: ${JSON.stringify(this.events.map((e) => e.message))}; stderr: ${this.stderr}`);
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        setTimeout(resolve, 200);
      });
    }
  }

  signal(s: NodeJS.Signals): void {
    this.child.kill(s);
  }
}
