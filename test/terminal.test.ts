import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readdir, readFile, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { CLI, cliEnv, vhdvault } from './helpers/cli.js';
import { makeRaw, tempDir } from './helpers/files.js';

// What people see on a terminal: progress bars, Ctrl-C, the backup summary. The CLI
// gets a pseudo-terminal from util-linux `script`, which copies the terminal's
// output (stdout and stderr together) to its own stdout.
const hasScript = spawnSync('script', ['--version']).status === 0;
const PRELOAD = fileURLToPath(new URL('./helpers/watchDropCaches.cjs', import.meta.url));
const MiB = 1024 * 1024;
const SHOW_CURSOR = '\x1b[?25h';

const quote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
const command = (args: string[]) => [process.execPath, CLI, ...args].map(quote).join(' ');

/** Run the CLI on a terminal; `redirect` is appended to its shell command line (e.g. "2>file"). */
function onTerminal(args: string[], redirect = ''): { code: number; output: string } {
  const r = spawnSync('script', ['-qec', `${command(args)} ${redirect}`, '/dev/null'], { encoding: 'utf8', timeout: 20_000 });
  return { code: r.status ?? -1, output: r.stdout };
}

/**
 * Run the CLI on a terminal and, once `ready` matches its output, type Ctrl-C
 * into the terminal (or send `signal` to the CLI's pid when given).
 */
/** `env`: assignments for the CLI's environment, as a shell writes them before a command. */
function interruptOnTerminal(args: string[], ready: RegExp, signal?: NodeJS.Signals, env = ''): Promise<{ code: number | null; output: string; sent: number }> {
  // The shell prints its pid, then becomes the CLI (exec keeps the pid).
  const child = spawn('script', ['-qec', `echo "pid=$$"; ${env} exec ${command(args)}`, '/dev/null'], { stdio: ['pipe', 'pipe', 'inherit'] });
  let output = '';
  let sent = -1;
  const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
  child.stdout.setEncoding('utf8');
  child.stdout.on('data', (chunk: string) => {
    output += chunk;
    if (sent >= 0 || !ready.test(output)) return;
    sent = output.length;
    if (signal) process.kill(Number(/pid=(\d+)/.exec(output)![1]), signal);
    else child.stdin.write('\x03');
  });
  return new Promise((resolve) =>
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, output, sent });
    }),
  );
}

const temporaryFiles = async (dir: string) => (await readdir(dir)).filter((name) => name.endsWith('.tmp'));

describe.skipIf(!hasScript)('on a terminal', () => {
  let dir: string;
  let repo: string;
  let raw: string;

  beforeAll(async () => {
    dir = await tempDir();
    repo = join(dir, 'repo');
    raw = join(dir, 'disk.raw');
    await makeRaw(raw, 24 * MiB, [
      [0, MiB],
      [9 * MiB, 3 * MiB],
    ]);
    expect(vhdvault('init', repo).code).toBe(0);
  });

  it('backup off a terminal prints the id alone on stdout and nothing on stderr', () => {
    const r = vhdvault('backup', repo, 'vm', '--source', raw);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^\d{8}T\d{9}Z-[0-9a-f]{6}\n$/);
    expect(r.stderr).toBe('');
  });

  it('backup on a terminal adds a summary on stderr; stdout still holds the id alone', async () => {
    const errors = join(dir, 'backup.stderr');
    const r = onTerminal(['backup', repo, 'vm', '--source', raw], `2>${quote(errors)}`);
    expect(r.code).toBe(0);
    const id = r.output.trim();
    expect(id).toMatch(/^\d{8}T\d{9}Z-[0-9a-f]{6}$/);
    expect(await readFile(errors, 'utf8')).toMatch(new RegExp(`^delta backup ${id}: 12 blocks read, 0 written \\(0 B\\) in \\d+\\.\\d s\\n$`));
    // stderr a terminal too: the progress bar, then the summary after the id.
    const both = onTerminal(['backup', repo, 'vm', '--source', raw, '--full']);
    expect(both.code).toBe(0);
    expect(both.output).toMatch(/backup vm \[.*100%/);
    expect(both.output).toMatch(/\d{8}T\d{9}Z-[0-9a-f]{6}\r\nfull backup \S+: 12 blocks read, 3 written \(\d+\.\d MiB\) in \d+\.\d s\r\n/);
  });

  it('restore, verify and convert show a progress bar and give the cursor back', () => {
    const runs = [
      { args: ['restore', repo, 'vm', join(dir, 'restored.vhd')], bar: /restore vm \[.*100% \| [\d.]+ MiB written/ },
      { args: ['restore', repo, 'vm', join(dir, 'restored.raw')], bar: /restore vm \[.*100% \| 24\.0 MiB written/ },
      { args: ['verify', repo], bar: /verify \[.*100% \| 12\.0 MiB read/ },
      { args: ['vhd', 'convert', raw, join(dir, 'converted.vhd')], bar: /convert \[.*100% \| 24\.0 MiB read/ },
    ];
    for (const { args, bar } of runs) {
      const r = onTerminal(args);
      expect(r.code, r.output).toBe(0);
      expect(r.output).toMatch(bar);
      // Rate and ETA are ours: '…' in the first second, then a rate and seconds (never cli-progress' own bare number).
      expect(r.output).toMatch(/ \| (…|[\d.]+ [KMG]?i?B\/s) \| ETA (…|\d+s)\x1b/);
      expect(r.output).not.toMatch(/ETA \d+\x1b/);
      expect(r.output).toContain(SHOW_CURSOR);
    }
  });

  it('prints no progress when stderr is not a terminal, or with --json', () => {
    for (const args of [
      ['restore', repo, 'vm', join(dir, 'plain.raw')],
      ['verify', repo],
      ['vhd', 'convert', raw, join(dir, 'plain.vhd')],
    ]) {
      const r = vhdvault(...args);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stderr).toBe('');
      expect(r.stdout).not.toContain('\x1b');
      expect(r.stdout).not.toContain('MiB/s');
    }
    // A terminal, but --json: the output is the JSON alone.
    const json = onTerminal(['verify', repo, '--json']);
    expect(json.code).toBe(0);
    expect(JSON.parse(json.output)).toMatchObject({ ok: true, backups: 3 });
  });

  describe('interrupted', () => {
    let big: string;
    let noQemuImg: string;
    beforeAll(async () => {
      noQemuImg = `PATH=${join(dir, 'no-tools')}`;
      // Sparse: it costs no space. Without qemu-img on the PATH (whose map names its holes, see
      // rawExtents.ts) every block is read: converting it takes seconds, long enough to interrupt.
      big = join(dir, 'big.raw');
      await writeFile(big, '');
      await truncate(big, 4 * 1024 * MiB);
    });

    it('Ctrl-C during a convert: cursor shown, one line, exit 130, no temporary file left', async () => {
      const out = join(dir, 'big.vhd');
      const r = await interruptOnTerminal(['vhd', 'convert', big, out], /convert \[.*MiB read/, undefined, noQemuImg);
      expect(r.sent, r.output).toBeGreaterThan(0);
      expect(r.code, r.output).toBe(130);
      const after = r.output.slice(r.sent);
      expect(after).toContain(SHOW_CURSOR);
      expect(after.match(/vhdvault: interrupted/g)).toHaveLength(1);
      expect(after).not.toMatch(/\n\s+at /); // no stack trace
      expect(existsSync(out)).toBe(false);
      expect(await temporaryFiles(dir)).toEqual([]);
    });

    it('SIGTERM during a convert exits 143, the same way', async () => {
      const out = join(dir, 'big-term.vhd');
      const r = await interruptOnTerminal(['vhd', 'convert', big, out], /convert \[.*MiB read/, 'SIGTERM', noQemuImg);
      expect(r.code, r.output).toBe(143);
      expect(r.output.slice(r.sent)).toContain(SHOW_CURSOR);
      expect(r.output).toContain('vhdvault: interrupted');
      expect(existsSync(out)).toBe(false);
      expect(await temporaryFiles(dir)).toEqual([]);
    });
  });
});

describe('bench stages', () => {
  /** Run `bench stages --json` with writes to drop_caches recorded (never performed). */
  async function benchStages(dir: string, log: string, ...extra: string[]) {
    const child = spawn(process.execPath, ['-r', PRELOAD, CLI, 'bench', 'stages', '--repo', dir, '--json', ...extra], { env: cliEnv({ VHDVAULT_DROP_LOG: log }) });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d));
    child.stderr.on('data', (d: Buffer) => (stderr += d));
    const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
    expect(code, stderr).toBe(0);
    const rows = (JSON.parse(stdout) as { stages: Array<{ stage: string; note: string }> }).stages;
    return { read: rows.find((r) => r.stage === 'read')!, dropped: existsSync(log) ? await readFile(log, 'utf8') : null };
  }

  it('drops the page cache only with --drop-caches', async () => {
    const dir = await tempDir();
    expect(vhdvault('init', join(dir, 'repo')).code).toBe(0);
    // Both at once: each takes about 4 s, mostly single-threaded timing loops.
    const [plain, asked] = await Promise.all([
      benchStages(join(dir, 'repo'), join(dir, 'plain.log')),
      benchStages(join(dir, 'repo'), join(dir, 'asked.log'), '--drop-caches'),
    ]);
    expect(plain.dropped).toBeNull();
    expect(plain.read.note).not.toMatch(/dropped/);
    expect(plain.read.note).toMatch(/O_DIRECT/);
    // The hook sees the drop when it is asked for, so the check above can fail.
    expect(asked.dropped).toBe('1\n');
    expect(asked.read.note).toMatch(/page cache dropped/);
  });
});
