import { readFile, stat } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, resolve } from 'node:path';
import { describeFsError, VaultError } from '../util/errors.js';

/**
 * Xen Orchestra's backup remotes keep each VHD (usually a directory under
 * `data/`) behind an alias: a small text file named `*.alias.vhd` holding one
 * path, relative to the alias's own folder. Children name their parent by its
 * alias, so the data can be moved by rewriting one alias.
 */
export const ALIAS_SUFFIX = '.alias.vhd';

/** An alias holds one relative path: anything larger is not one (XO itself stops at 1 KiB). */
export const MAX_ALIAS_BYTES = 4096;

export function isAliasName(path: string): boolean {
  return basename(path).endsWith(ALIAS_SUFFIX);
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** True when a relative path names something below its starting folder and no `..` ever climbs above it. */
function staysInside(target: string): boolean {
  let depth = 0;
  for (const part of target.split(/[\\/]+/)) {
    if (part === '..') depth--;
    else if (part !== '.' && part !== '') depth++;
    if (depth < 0) return false;
  }
  return depth > 0;
}

/**
 * The VHD an alias points to. Refused: an alias that is not small UTF-8 text
 * of one line, that holds an absolute path, that leaves the alias's folder, or
 * that names another alias (XO forbids chains of aliases too). A folder named
 * like an alias is a VHD directory, not an alias: returned as is.
 */
export async function resolveAlias(alias: string): Promise<string> {
  const s = await stat(alias).catch((err: unknown) => {
    throw new VaultError(alias, describeFsError(err));
  });
  if (s.isDirectory()) return alias;
  if (!s.isFile()) throw new VaultError(alias, 'is named like an alias (*.alias.vhd) but is not a regular file');
  if (s.size > MAX_ALIAS_BYTES) throw new VaultError(alias, `is ${s.size} bytes: too large for an alias file (at most ${MAX_ALIAS_BYTES})`);
  let bytes: Buffer;
  try {
    bytes = await readFile(alias);
  } catch (err) {
    throw new VaultError(alias, describeFsError(err));
  }
  if (bytes.length > MAX_ALIAS_BYTES) throw new VaultError(alias, `grew past ${MAX_ALIAS_BYTES} bytes: too large for an alias file`);
  let text: string;
  try {
    text = utf8.decode(bytes);
  } catch {
    throw new VaultError(alias, 'is not a valid alias file: not UTF-8 text');
  }
  const target = text.trim();
  if (target === '') throw new VaultError(alias, 'is an empty alias file: it names no VHD');
  if (/[\u0000-\u001f\u007f]/.test(target)) throw new VaultError(alias, 'is not a valid alias file: it must hold one line, a relative path');
  if (isAbsolute(target) || /^[A-Za-z]:|^\\/.test(target)) {
    throw new VaultError(alias, `holds the absolute path ${target}: an alias must hold a path relative to its folder`);
  }
  if (!staysInside(target)) {
    throw new VaultError(alias, `points to ${target}, outside its folder ${dirname(resolve(alias))}: refusing to follow it`);
  }
  const path = join(dirname(alias), target);
  if (isAliasName(path)) throw new VaultError(alias, `points to another alias (${target}): aliases cannot be chained`);
  await stat(path).catch((err: unknown) => {
    throw new VaultError(alias, `points to ${target}: ${describeFsError(err)}`);
  });
  return path;
}
