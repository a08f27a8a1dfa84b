/**
 * The documentation against the CLI: every line of a fenced code block in README.md and
 * docs/**\/*.md that begins with `vhdvault ` (after an optional `$ `) must name a command
 * that exists, and every `--option` on it must be listed by that command's `--help`.
 * So a renamed or removed option fails here, naming the page and line to fix.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { vhdvaultAsync } from './helpers/cli.js';

const ROOT = fileURLToPath(new URL('..', import.meta.url));

interface CommandLine {
  /** Where it is, as `file:line`. */
  where: string;
  text: string;
}

interface Help {
  /** The long options the command lists (`--json`, …). */
  options: Set<string>;
  /** Its subcommands; empty for a command that does the work itself. */
  commands: Set<string>;
}

async function markdownFiles(): Promise<string[]> {
  const files = [join(ROOT, 'README.md')];
  const walk = async (dir: string): Promise<void> => {
    for (const entry of await readdir(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) await walk(path);
      else if (entry.name.endsWith('.md')) files.push(path);
    }
  };
  await walk(join(ROOT, 'docs'));
  return files.sort();
}

/** The `vhdvault …` lines of a page's fenced code blocks, continuation lines (`\`) joined. */
function commandLines(file: string, markdown: string): CommandLine[] {
  const found: CommandLine[] = [];
  const lines = markdown.split('\n');
  let fence: string | null = null;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    const marker = /^(`{3,}|~{3,})/.exec(line)?.[1];
    if (marker !== undefined) {
      if (fence === null) fence = marker;
      else if (marker[0] === fence[0] && marker.length >= fence.length && line === marker) fence = null;
      continue;
    }
    if (fence === null) continue;
    const start = i;
    let text = line;
    while (text.endsWith('\\') && i + 1 < lines.length) text = `${text.slice(0, -1).trimEnd()} ${lines[++i]!.trim()}`;
    const command = /^(?:\$ )?(vhdvault (?:.*))$/.exec(text)?.[1];
    if (command !== undefined) found.push({ where: `${file}:${start + 1}`, text: command });
  }
  return found;
}

/** Shell words of a command line, up to a comment, a pipe, a redirection or the next command. */
function words(text: string): string[] {
  const out: string[] = [];
  let word = '';
  let quote: string | null = null;
  let inWord = false;
  const end = () => {
    if (inWord) out.push(word);
    word = '';
    inWord = false;
  };
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (quote !== null) {
      if (c === quote) quote = null;
      else word += c;
      continue;
    }
    if (c === "'" || c === '"') {
      quote = c;
      inWord = true;
    } else if (/\s/.test(c)) end();
    else if (c === '#' && !inWord) break;
    else if ((c === '|' || c === ';' || c === '&' || c === '>') && !inWord) break;
    else {
      word += c;
      inWord = true;
    }
  }
  end();
  return out;
}

function parseHelp(text: string): Help {
  const options = new Set<string>();
  const commands = new Set<string>();
  let section = '';
  for (const line of text.split('\n')) {
    const heading = /^(\w[\w ]*):$/.exec(line);
    if (heading) {
      section = heading[1]!;
      continue;
    }
    // Terms are indented by two spaces; wrapped descriptions by more.
    if (!/^ {2}\S/.test(line)) continue;
    if (section === 'Options') {
      const option = /^ {2}(?:-\w, )?(--[\w-]+)/.exec(line)?.[1];
      if (option !== undefined) options.add(option);
    } else if (section === 'Commands') {
      const command = /^ {2}([\w-]+)/.exec(line)?.[1];
      if (command !== undefined) commands.add(command);
    }
  }
  return { options, commands };
}

const name = (path: string[]) => ['vhdvault', ...path].join(' ');

/** `vhdvault <path…> --help`, once per command. */
const helps = new Map<string, Promise<Help>>();
function help(path: string[]): Promise<Help> {
  const key = name(path);
  let cached = helps.get(key);
  if (cached === undefined) {
    cached = vhdvaultAsync(...path, '--help').then((r) => {
      if (r.code !== 0) throw new Error(`${key} --help: exit ${r.code}\n${r.stderr}`);
      return parseHelp(r.stdout);
    });
    helps.set(key, cached);
  }
  return cached;
}

/** What is wrong with a documented command line: an unknown command or option; empty when nothing is. */
async function problems(text: string): Promise<string[]> {
  const args = words(text).slice(1);
  const path: string[] = [];
  let h = await help(path);
  let i = 0;
  // Down the command groups (vhdvault vhd convert …) to the command that does the work.
  while (h.commands.size > 0 && i < args.length) {
    const arg = args[i++]!;
    if (arg.startsWith('-')) {
      const option = arg.split('=')[0]!;
      if (option.startsWith('--') && !h.options.has(option)) return [`"${name(path)}" has no option ${option}`];
      continue;
    }
    if (!h.commands.has(arg)) return [`"${name([...path, arg])}" is not a command`];
    path.push(arg);
    h = await help(path);
  }
  const found: string[] = [];
  for (const arg of args.slice(i)) {
    if (arg === '--') break;
    if (!arg.startsWith('--')) continue;
    const option = arg.split('=')[0]!;
    if (!h.options.has(option)) found.push(`"${name(path)}" has no option ${option}`);
  }
  return found;
}

describe('the commands in the documentation match the CLI', () => {
  it('every vhdvault line names a command that exists, with options its --help lists', async () => {
    const lines: CommandLine[] = [];
    for (const file of await markdownFiles()) lines.push(...commandLines(relative(ROOT, file), await readFile(file, 'utf8')));
    // The README's first backup, and every page of command examples, are read.
    expect(lines.length).toBeGreaterThan(80);
    expect(lines.some((l) => l.where.startsWith('README.md:'))).toBe(true);
    const wrong = (await Promise.all(lines.map(async (l) => (await problems(l.text)).map((p) => `${l.where}: ${p}: ${l.text}`)))).flat();
    expect(wrong).toEqual([]);
  });

  it('names an option or a command that does not exist', async () => {
    expect(await problems('vhdvault init /backups --layout dir --compression gzip')).toEqual([]);
    expect(await problems('vhdvault vhd convert a.vhd - --format vhd | gzip --best > a.gz')).toEqual([]);
    expect(await problems("vhdvault backup /b vm1 --source 'nbd+unix:///?socket=/s' --json   # --not-an-option")).toEqual([]);
    expect(await problems('vhdvault init /backups --layuot dir')).toEqual(['"vhdvault init" has no option --layuot']);
    expect(await problems('vhdvault restore /b vm1 out.raw --backup=x --keep-last 3')).toEqual(['"vhdvault restore" has no option --keep-last']);
    expect(await problems('vhdvault vhd frobnicate a.vhd')).toEqual(['"vhdvault vhd frobnicate" is not a command']);
    expect(await problems('vhdvault restroe /b vm1 out.raw')).toEqual(['"vhdvault restroe" is not a command']);
  });

  it('reads fenced blocks only, with prompts, indentation and continuation lines', () => {
    const page = [
      'vhdvault outside --a-fence',
      '```sh',
      '$ vhdvault list /b',
      'echo vhdvault not-a-command',
      '  vhdvault backup /b vm1 --source x \\',
      '      --json',
      '```',
      'vhdvault after --the-fence',
    ].join('\n');
    expect(commandLines('page.md', page)).toEqual([
      { where: 'page.md:3', text: 'vhdvault list /b' },
      { where: 'page.md:5', text: 'vhdvault backup /b vm1 --source x --json' },
    ]);
  });
});
