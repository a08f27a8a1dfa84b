/**
 * Where the password of an encrypted repository comes from, in this order:
 * VHDVAULT_PASSWORD, --password-file, VHDVAULT_PASSWORD_COMMAND (its
 * standard output), a prompt on the terminal (not echoed). Scheduled jobs and
 * scripts use the first three; a person at a terminal the last
 * (docs/design/12-encryption.md).
 */
import { spawn } from 'node:child_process';
import { open } from 'node:fs/promises';
import { describeFsError, VaultError } from '../util/errors.js';

export const PASSWORD_ENV = 'VHDVAULT_PASSWORD';
export const PASSWORD_COMMAND_ENV = 'VHDVAULT_PASSWORD_COMMAND';
/** What --password-file sets for the run (so that what the command starts reads it too); a user may set it as well. */
export const PASSWORD_FILE_ENV = 'VHDVAULT_PASSWORD_FILE';

/** A replication's destination, when its password differs from the source's: the same three sources under these names. */
export const TARGET_PASSWORD_ENV = 'VHDVAULT_TARGET_PASSWORD';
export const TARGET_PASSWORD_FILE_ENV = 'VHDVAULT_TARGET_PASSWORD_FILE';
export const TARGET_PASSWORD_COMMAND_ENV = 'VHDVAULT_TARGET_PASSWORD_COMMAND';

/**
 * Where the destination's password comes from: its own sources when any of
 * them is set (--target-password-file sets the file's), else the source's
 * (one password for both), then the prompt, which names the destination.
 */
export function targetSources(env: NodeJS.ProcessEnv = process.env): PasswordSources {
  if (!env[TARGET_PASSWORD_ENV] && !env[TARGET_PASSWORD_FILE_ENV] && !env[TARGET_PASSWORD_COMMAND_ENV]) return {};
  return { env: { [PASSWORD_ENV]: env[TARGET_PASSWORD_ENV], [PASSWORD_FILE_ENV]: env[TARGET_PASSWORD_FILE_ENV], [PASSWORD_COMMAND_ENV]: env[TARGET_PASSWORD_COMMAND_ENV] } };
}

/** A new password (key add, key passwd): the same three sources under these names, or typed twice. */
export const NEW_PASSWORD_ENV = 'VHDVAULT_NEW_PASSWORD';
export const NEW_PASSWORD_COMMAND_ENV = 'VHDVAULT_NEW_PASSWORD_COMMAND';

export function newPasswordSources(file: string | undefined, env: NodeJS.ProcessEnv = process.env): PasswordSources {
  return {
    env: { [PASSWORD_ENV]: env[NEW_PASSWORD_ENV], [PASSWORD_COMMAND_ENV]: env[NEW_PASSWORD_COMMAND_ENV] },
    passwordFile: file,
    ways: `needs a new password: set ${NEW_PASSWORD_ENV}, give --new-password-file, set ${NEW_PASSWORD_COMMAND_ENV}, or run on a terminal`,
  };
}

/** A password is a line, not a document: what a file or a command may give, bounded. */
const MAX_PASSWORD_BYTES = 4096;

/** Control bytes a terminal in raw mode sends. */
const ENTER = new Set([0x0a, 0x0d]);
const BACKSPACE = new Set([0x08, 0x7f]);
const CTRL_C = 0x03;
const CTRL_D = 0x04;

export interface PasswordSources {
  /** --password-file. */
  passwordFile?: string;
  env?: NodeJS.ProcessEnv;
  /** The terminal to prompt on (default: standard input and standard error, when both are terminals). */
  terminal?: { input: NodeJS.ReadStream; output: NodeJS.WriteStream };
  /** false: never prompt (a check made in passing must not stop to ask). */
  prompt?: boolean;
  /** The message when none is given, saying the ways to give this password (default: the four of an existing password). */
  ways?: string;
}

/** The password for `repo` (as the user should see it named), or one line saying how to give one. */
export async function readPassword(repo: string, sources: PasswordSources = {}): Promise<string> {
  const given = await givenPassword(sources);
  if (given !== null) return given;
  return promptPassword(repo, terminalOf(repo, sources), `Password for ${repo}: `);
}

/**
 * A new password for `repo` (init, key add, key passwd): from the same
 * sources, but typed twice on a terminal, since a typo would lock the
 * repository for good.
 */
export async function readNewPassword(repo: string, sources: PasswordSources = {}, what = 'New password'): Promise<string> {
  const given = await givenPassword(sources);
  if (given !== null) return given;
  const terminal = terminalOf(repo, sources);
  const first = await promptPassword(repo, terminal, `${what} for ${repo}: `);
  const again = await promptPassword(repo, terminal, 'The same again: ');
  if (first !== again) throw new VaultError(repo, 'the two passwords typed differ: nothing changed');
  return first;
}

/** The password the environment, a file or a command gives, in that order; null when none does. */
async function givenPassword(sources: PasswordSources): Promise<string | null> {
  const env = sources.env ?? process.env;
  const fromEnv = env[PASSWORD_ENV];
  if (fromEnv !== undefined && fromEnv !== '') return fromEnv;
  const file = sources.passwordFile ?? (env[PASSWORD_FILE_ENV] || undefined);
  if (file !== undefined) return passwordFromFile(file);
  const command = env[PASSWORD_COMMAND_ENV];
  if (command !== undefined && command.trim() !== '') return passwordFromCommand(command);
  return null;
}

function terminalOf(repo: string, sources: PasswordSources): { input: NodeJS.ReadStream; output: NodeJS.WriteStream } {
  const terminal = sources.prompt === false ? null : (sources.terminal ?? (process.stdin.isTTY && process.stderr.isTTY ? { input: process.stdin, output: process.stderr } : null));
  if (terminal) return terminal;
  throw new VaultError(repo, sources.ways ?? `needs a password: set ${PASSWORD_ENV}, give --password-file, set ${PASSWORD_COMMAND_ENV}, or run on a terminal`);
}

/** A password file's first line (one trailing newline dropped), read up to the bound. */
async function passwordFromFile(path: string): Promise<string> {
  let fh;
  try {
    fh = await open(path, 'r');
  } catch (err) {
    throw new VaultError(path, `cannot read the password file: ${describeFsError(err)}`);
  }
  try {
    const buf = Buffer.alloc(MAX_PASSWORD_BYTES + 1);
    const { bytesRead } = await fh.read(buf, 0, buf.length, 0);
    if (bytesRead > MAX_PASSWORD_BYTES) throw new VaultError(path, `larger than ${MAX_PASSWORD_BYTES} bytes: not a password file`);
    return checked(path, 'the password file', buf.subarray(0, bytesRead));
  } catch (err) {
    if (err instanceof VaultError) throw err;
    throw new VaultError(path, `cannot read the password file: ${describeFsError(err)}`);
  } finally {
    await fh.close();
  }
}

/**
 * The standard output of `command`, run by /bin/sh. Its standard error goes
 * to ours: a password manager may ask something there. No time limit: it may
 * wait for a person.
 */
function passwordFromCommand(command: string): Promise<string> {
  const what = `${PASSWORD_COMMAND_ENV} (${command})`;
  return new Promise((resolve, reject) => {
    const child = spawn('/bin/sh', ['-c', command], { stdio: ['inherit', 'pipe', 'inherit'] });
    const chunks: Buffer[] = [];
    let size = 0;
    let tooLong = false;
    child.stdout.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > MAX_PASSWORD_BYTES) {
        tooLong = true;
        // Closing the pipe ends the writer too (SIGPIPE), also when it is a child of the shell that is killed.
        child.stdout.destroy();
        child.kill('SIGTERM');
      } else chunks.push(chunk);
    });
    child.once('error', (err) => reject(new VaultError(what, `could not run: ${err.message}`)));
    child.once('close', (code, signal) => {
      if (tooLong) return reject(new VaultError(what, `printed more than ${MAX_PASSWORD_BYTES} bytes: not a password`));
      if (code !== 0) return reject(new VaultError(what, `failed (${code === null ? `killed by ${signal}` : `exit ${code}`}): no password`));
      try {
        resolve(checked(what, 'its output', Buffer.concat(chunks)));
      } catch (err) {
        reject(err);
      }
    });
  });
}

/** One trailing newline (\n or \r\n) dropped; an empty password, or one of several lines, refused. */
function checked(what: string, where: string, bytes: Buffer): string {
  const text = bytes.toString('utf8').replace(/\r?\n$/, '');
  if (text === '') throw new VaultError(what, `${where} holds no password (it is empty)`);
  if (/[\r\n]/.test(text)) throw new VaultError(what, `${where} holds more than one line: a password is one line`);
  return text;
}

/** Ask on the terminal, echoing nothing; Enter ends, Backspace erases, Ctrl-C or Ctrl-D on an empty line gives up. */
function promptPassword(repo: string, terminal: { input: NodeJS.ReadStream; output: NodeJS.WriteStream }, prompt: string): Promise<string> {
  const { input, output } = terminal;
  const wasRaw = input.isRaw;
  // Raw before the prompt shows: keys typed as soon as it appears are never echoed nor
  // edited by the terminal's line discipline (which would erase a byte, not a character).
  input.setRawMode(true);
  output.write(prompt);
  input.resume();
  return new Promise((resolve, reject) => {
    let typed: Buffer = Buffer.alloc(0);
    const finish = (err: Error | null) => {
      input.off('data', onData);
      input.off('end', onEnd);
      input.setRawMode(wasRaw);
      input.pause();
      output.write('\n');
      if (err) reject(err);
      else resolve(typed.toString('utf8'));
    };
    const onData = (chunk: Buffer) => {
      for (const byte of chunk) {
        if (ENTER.has(byte)) return finish(typed.length > 0 ? null : new VaultError(repo, 'no password typed'));
        if (byte === CTRL_C || (byte === CTRL_D && typed.length === 0)) return finish(new VaultError(repo, 'password prompt interrupted'));
        if (BACKSPACE.has(byte)) typed = eraseLastCharacter(typed);
        else if (byte >= 0x20) {
          if (typed.length >= MAX_PASSWORD_BYTES) return finish(new VaultError(repo, `password longer than ${MAX_PASSWORD_BYTES} bytes`));
          typed = Buffer.concat([typed, Buffer.from([byte])]);
        }
      }
    };
    // The terminal went away (hung up) before Enter: nothing more will come.
    const onEnd = () => finish(new VaultError(repo, 'password prompt interrupted'));
    input.on('data', onData);
    input.once('end', onEnd);
  });
}

/** Drop the last UTF-8 character (its continuation bytes 10xxxxxx, then its lead byte). */
function eraseLastCharacter(bytes: Buffer): Buffer {
  let end = bytes.length;
  while (end > 0 && (bytes[end - 1]! & 0xc0) === 0x80) end--;
  return bytes.subarray(0, Math.max(0, end - 1));
}
