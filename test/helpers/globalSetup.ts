import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';

/** `vhdvault-run-<pid>-<random>`: the temporary folder of one test run (the pid of its vitest). */
const RUN_PREFIX = 'vhdvault-run-';
const RUN_FOLDER = new RegExp(`^${RUN_PREFIX}(\\d+)-`);

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Run folders of runs that were killed before their teardown (their vitest is gone). */
function removeStaleRunFolders(parent: string): void {
  for (const name of readdirSync(parent)) {
    const pid = Number(RUN_FOLDER.exec(name)?.[1] ?? NaN);
    if (Number.isSafeInteger(pid) && pid !== process.pid && !alive(pid)) rmSync(join(parent, name), { recursive: true, force: true });
  }
}

/** What is in `dir`: each entry, and for a folder an example of what it holds and how many files. */
function contents(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).map((e) => {
    if (!e.isDirectory()) return join(dir, e.name);
    const files = readdirSync(join(dir, e.name), { recursive: true, withFileTypes: true }).filter((f) => !f.isDirectory());
    const example = files[0] ? `, e.g. ${join(files[0].parentPath, files[0].name)}` : '';
    return `${join(dir, e.name)}/ (${files.length} file(s)${example})`;
  });
}

/**
 * CLI tests drive the built binary exactly as users do: build it once first.
 * Incrementally (the build info lives in dist/, so it goes when dist/ goes):
 * a run after a small change recompiles what changed instead of everything,
 * and tsc runs directly rather than through npx.
 *
 * Then the run gets temporary folders of its own, which the test workers and
 * every process they start inherit: TMPDIR (a folder under the system's), a
 * cache home inside it (XDG_CACHE_HOME: an object store's block-map cache), and
 * a folder in /dev/shm for s3rver's data (VHDVAULT_TEST_SHM). (What is meant to
 * outlive a run goes to the user's cache home, passed on as VHDVAULT_TEST_CACHE_HOME.) At the end they
 * must be empty: the teardown names whatever a test left and fails the run,
 * and removes them either way.
 */
export default function setup(): () => void {
  const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
  execFileSync(process.execPath, [tsc, '-p', 'tsconfig.build.json', '--incremental', '--tsBuildInfoFile', 'dist/.tsbuildinfo-tests'], { stdio: 'inherit' });

  const parents = [tmpdir(), ...(existsSync('/dev/shm') ? ['/dev/shm'] : [])];
  for (const parent of parents) removeStaleRunFolders(parent);
  const [temp, shm] = parents.map((parent) => mkdtempSync(join(parent, `${RUN_PREFIX}${process.pid}-`)));
  const saved = { TMPDIR: process.env.TMPDIR, XDG_CACHE_HOME: process.env.XDG_CACHE_HOME, VHDVAULT_TEST_SHM: process.env.VHDVAULT_TEST_SHM, VHDVAULT_TEST_CACHE_HOME: process.env.VHDVAULT_TEST_CACHE_HOME };
  // The user's own cache home, for what outlives a run on purpose (the real guest's initramfs: test/helpers/guest.ts).
  process.env.VHDVAULT_TEST_CACHE_HOME ||= process.env.XDG_CACHE_HOME || join(homedir(), '.cache');
  process.env.TMPDIR = temp!;
  process.env.XDG_CACHE_HOME = join(temp!, 'cache');
  if (shm) process.env.VHDVAULT_TEST_SHM = shm;

  return () => {
    const left: string[] = [];
    for (const folder of [temp!, ...(shm ? [shm] : [])]) {
      try {
        left.push(...contents(folder));
      } finally {
        rmSync(folder, { recursive: true, force: true });
      }
    }
    for (const [name, value] of Object.entries(saved)) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
    if (left.length > 0) {
      throw new Error(`the tests left ${left.length} thing(s) in the run's temporary folders (removed now): a test or helper must remove what it creates, also when it fails:\n  ${left.join('\n  ')}`);
    }
  };
}
