/**
 * Where an encrypted repository's password comes from (src/crypto/password.ts):
 * VHDVAULT_PASSWORD, --password-file, VHDVAULT_PASSWORD_COMMAND, then a prompt
 * on a real terminal (a pty from util-linux's `script`), in that order; each
 * bad source is one line naming it.
 */
import { spawn } from 'node:child_process';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { readPassword } from '../src/crypto/password.js';
import { tempDir } from './helpers/files.js';

const REPO = '/backups/main';
let dir: string;

beforeAll(async () => {
  dir = await tempDir('vhdvault-password-');
});

/** The sources with no terminal to prompt on (the test runner's may be one). */
const noTerminal = (env: NodeJS.ProcessEnv, passwordFile?: string) => readPassword(REPO, { env, passwordFile });

describe('password sources, in order', () => {
  it('VHDVAULT_PASSWORD first, then --password-file, then VHDVAULT_PASSWORD_COMMAND', async () => {
    const file = join(dir, 'pw');
    await writeFile(file, 'from-file\n');
    const command = 'printf "from-command\\n"';
    expect(await noTerminal({ VHDVAULT_PASSWORD: 'from-env', VHDVAULT_PASSWORD_COMMAND: command }, file)).toBe('from-env');
    expect(await noTerminal({ VHDVAULT_PASSWORD_COMMAND: command }, file)).toBe('from-file');
    expect(await noTerminal({ VHDVAULT_PASSWORD_COMMAND: command })).toBe('from-command');
  });

  it('without any, and off a terminal: one line saying how to give one', async () => {
    if (process.stdin.isTTY && process.stderr.isTTY) return; // the runner's own terminal would be prompted on
    await expect(readPassword(REPO, { env: {} })).rejects.toThrow(
      `${REPO}: needs a password: set VHDVAULT_PASSWORD, give --password-file, set VHDVAULT_PASSWORD_COMMAND, or run on a terminal`,
    );
  });
});

describe('a password file', () => {
  it('gives its line without the newline (\\n or \\r\\n), and spaces as they are', async () => {
    const cases: Array<[string, string]> = [['a b c\n', 'a b c'], ['crlf\r\n', 'crlf'], ['no-newline', 'no-newline'], [' lead\n', ' lead']];
    for (const [text, want] of cases) {
      const file = join(dir, `ok-${want.trim()}`);
      await writeFile(file, text);
      expect(await noTerminal({}, file)).toBe(want);
    }
  });

  it('refuses one line naming the file: missing, a folder, empty, several lines, too large', async () => {
    const folder = join(dir, 'a-folder');
    await mkdir(folder);
    const cases: Array<[string, string | null, RegExp]> = [
      [join(dir, 'missing'), null, /cannot read the password file: no such file or directory$/],
      [folder, null, /cannot read the password file: is a directory$/],
      [join(dir, 'empty'), '\n', /the password file holds no password \(it is empty\)$/],
      [join(dir, 'lines'), 'one\ntwo\n', /holds more than one line: a password is one line$/],
      [join(dir, 'large'), 'x'.repeat(5000), /larger than 4096 bytes: not a password file$/],
    ];
    for (const [file, text, problem] of cases) {
      if (text !== null) await writeFile(file, text);
      const err = (await noTerminal({}, file).catch((e: unknown) => e)) as Error;
      expect(err.message.startsWith(`${file}: `), err.message).toBe(true);
      expect(err.message).toMatch(problem);
      expect(err.message).not.toContain('\n');
    }
  });
});

describe('a password command', () => {
  it('refuses one line naming it: failing, empty, endless output', async () => {
    const cases: Array<[string, RegExp]> = [
      ['echo oops >&2; exit 3', /failed \(exit 3\): no password$/],
      ['true', /its output holds no password \(it is empty\)$/],
      ['yes', /printed more than 4096 bytes: not a password$/],
    ];
    for (const [command, problem] of cases) {
      const err = (await noTerminal({ VHDVAULT_PASSWORD_COMMAND: command }).catch((e: unknown) => e)) as Error;
      expect(err.message.startsWith(`VHDVAULT_PASSWORD_COMMAND (${command}): `), err.message).toBe(true);
      expect(err.message).toMatch(problem);
    }
  });
});

describe('the prompt on a terminal', () => {
  const module = fileURLToPath(new URL('../dist/src/crypto/password.js', import.meta.url));

  /** Run readPassword in a child on a pty (script), type `keys` once the prompt shows; its result and what the terminal showed. */
  async function prompted(keys: string): Promise<{ result: { ok: boolean; value: string }; screen: string }> {
    const out = join(dir, `result-${Math.random().toString(16).slice(2)}.json`);
    const program = `import('${module}').then((m) => m.readPassword('${REPO}', { env: {} })).then((v) => ({ ok: true, value: v }), (e) => ({ ok: false, value: e.message })).then((r) => require('fs').writeFileSync('${out}', JSON.stringify(r)))`;
    const child = spawn('script', ['-qec', `${process.execPath} -e "${program.replace(/"/g, '\\"')}"`, '/dev/null'], { stdio: ['pipe', 'pipe', 'pipe'] });
    let screen = '';
    let typed = false;
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      screen += d;
      // Typed only once the prompt is up: the terminal is in raw mode then, and echoes nothing.
      if (!typed && screen.includes(`Password for ${REPO}: `)) {
        typed = true;
        child.stdin.write(keys);
      }
    });
    const code = await new Promise<number>((resolve) => child.once('close', (c) => resolve(c ?? -1)));
    expect(code, screen).toBe(0);
    return { result: JSON.parse(await readFile(out, 'utf8')) as { ok: boolean; value: string }, screen };
  }

  it('reads what is typed without echoing it; Backspace erases a character (UTF-8 too)', async () => {
    const { result, screen } = await prompted('s3cr\u00e9\x7fet!\r');
    expect(result).toEqual({ ok: true, value: 's3cret!' });
    expect(screen).not.toContain('s3cr');
    expect(screen).not.toContain('et!');
  });

  it('Ctrl-C gives up with one line, and Enter on nothing is no password', async () => {
    expect((await prompted('abc\x03')).result).toEqual({ ok: false, value: `${REPO}: password prompt interrupted` });
    expect((await prompted('\r')).result).toEqual({ ok: false, value: `${REPO}: no password typed` });
  });
});
