/**
 * A real Linux guest, from Debian packages only: the cloud kernel
 * (linux-image-cloud-amd64) booted by qemu-system-x86_64 straight into an
 * initramfs built here from busybox-static, the kernel's virtio modules and
 * qemu-ga (qemu-guest-agent) with its libraries. Its init mounts every ext4
 * disk (device vda → /mnt/vda, …), starts the guest agent on its virtio-serial
 * port and, when asked, a writer that puts the same increasing counter into
 * `/mnt/<disk>/counter` on every disk many times a second, each round followed
 * by `sync`. Disks are made on the host by makeExt4Disk (mkfs.ext4, e2fsprogs).
 *
 * The initramfs is built once per machine and kept in the user's cache home
 * (see guestCacheRoot), in a folder named after the kernel and a key over
 * everything that goes in; the build happens in a temporary folder that is
 * then renamed, so that test files starting side by side never see half an
 * image (the loser of a race throws its copy away).
 *
 * `guestMissing` says which package is missing, if one is: `npm start` then
 * leaves the whole-VM part out, and the tests skip (test/helpers/guest.ts,
 * which also stops every guest a test file booted after it). The bench
 * (bench/vm.bench.ts) and the demo call stopGuests at their end.
 */
import { type ChildProcess, execFile, spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { accessSync, constants, existsSync, readdirSync, readFileSync, realpathSync, statSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, open, readdir, rename, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { homedir, tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { promisify } from 'node:util';
import { gzipSync } from 'node:zlib';
import { QmpClient } from '../qmp/QmpClient.js';
import { kvmUsable } from '../util/device.js';
import { socketState } from '../util/unixSocket.js';

const execFileAsync = promisify(execFile);

/** What the guest prints once its disks are mounted, its agent runs and its writer (if any) started. */
export const READY = 'VHDVAULT-GUEST-READY';
/** What it prints when it cannot get there (then it powers off). */
export const FAILED = 'VHDVAULT-GUEST-FAILED';
/** What starts each line of the writer's round times (vhdvault.latency=1): the round's number, start and end. */
export const ROUND = 'VHDVAULT-ROUND';
/** The name QEMU and libvirt give the guest agent's port. */
export const AGENT_PORT = 'org.qemu.guest_agent.0';
/** The drivers the guest needs; those built into the kernel are skipped, the others loaded with their dependencies. */
const WANTED_MODULES = ['virtio_pci', 'virtio_blk', 'virtio_console', 'ext4'];

const BUSYBOX = '/bin/busybox';
const QEMU_GA = '/usr/sbin/qemu-ga';

const has = (command: string) => spawnSync(command, ['--version'], { stdio: 'ignore' }).error === undefined;

/** A program's path: on PATH, or in /usr/sbin or /sbin (e2fsprogs' tools, off a user's PATH), else null. */
function program(name: string): string | null {
  for (const dir of [...(process.env.PATH ?? '').split(':').filter(Boolean), '/usr/sbin', '/sbin']) {
    try {
      accessSync(join(dir, name), constants.X_OK);
      return join(dir, name);
    } catch {
      // not here
    }
  }
  return null;
}

const MKFS = program('mkfs.ext4');
const E2FSCK = program('e2fsck');
const DEBUGFS = program('debugfs');

/** The newest installed cloud kernel that has its modules, else null. */
function findKernel(): { version: string; image: string; modules: string } | null {
  let names: string[];
  try {
    names = readdirSync('/boot');
  } catch {
    return null;
  }
  const versions = names
    .map((n) => /^vmlinuz-(.+-cloud-amd64)$/.exec(n)?.[1])
    .filter((v): v is string => v !== undefined && existsSync(`/lib/modules/${v}/modules.dep`))
    .sort((a, b) => a.localeCompare(b, 'en', { numeric: true }));
  const version = versions.at(-1);
  return version === undefined ? null : { version, image: `/boot/vmlinuz-${version}`, modules: `/lib/modules/${version}` };
}

const kernel = findKernel();

function missingPackages(): string | undefined {
  const missing: string[] = [];
  if (!has('qemu-system-x86_64')) missing.push('qemu-system-x86');
  if (!has('qemu-img')) missing.push('qemu-utils');
  if (kernel === null) missing.push('linux-image-cloud-amd64');
  if (!existsSync(BUSYBOX)) missing.push('busybox-static');
  if (!existsSync(QEMU_GA)) missing.push('qemu-guest-agent');
  if (!MKFS || !E2FSCK || !DEBUGFS) missing.push('e2fsprogs');
  return missing.length ? `the real guest needs Debian packages not installed here: ${missing.join(' ')}` : undefined;
}

/** Why the guest tests cannot run here (outside CI only), else undefined: for describe.skipIf. */
export const guestMissing = missingPackages();

// ---------------------------------------------------------------------------
// The initramfs

/**
 * Where built initramfs images are kept: the user's cache home as it was before
 * the test run replaced XDG_CACHE_HOME with a folder inside the run's TMPDIR
 * (globalSetup passes it on as VHDVAULT_TEST_CACHE_HOME). Not the run's TMPDIR:
 * that is removed after every run and must be empty by then, and the image only
 * changes when the packages (or this file) do, which its key covers.
 */
export function guestCacheRoot(): string {
  const home = process.env.VHDVAULT_TEST_CACHE_HOME || process.env.XDG_CACHE_HOME || join(homedir(), '.cache');
  return join(home, 'vhdvault-tests');
}

/** The absolute paths of the shared libraries `ldd` names for `binary`, the loader included (none for a static binary). */
function libraries(binary: string): string[] {
  const r = spawnSync('ldd', [binary], { encoding: 'utf8' });
  if (r.error) throw new Error(`ldd ${binary}: ${r.error.message}`);
  if (r.status !== 0) {
    if (/not a dynamic executable|statically linked/.test(r.stdout + r.stderr)) return [];
    throw new Error(`ldd ${binary} failed: ${(r.stdout + r.stderr).trim()}`);
  }
  const libs: string[] = [];
  for (const line of r.stdout.split('\n')) {
    if (/statically linked/.test(line)) continue;
    const m = /=>\s*(\/\S+)/.exec(line) ?? /^\s*(\/\S+)/.exec(line);
    if (m) libs.push(m[1]!);
    else if (/=> not found/.test(line)) throw new Error(`ldd ${binary}: ${line.trim()}`);
  }
  return libs;
}

const moduleName = (file: string) => basename(file).replace(/\.ko(\.\w+)?$/, '').replace(/-/g, '_');

/**
 * The module files to load, dependencies first (from depmod's modules.dep of
 * the kernel), for the WANTED_MODULES not built into the kernel.
 */
function moduleFiles(modulesDir: string): string[] {
  const builtin = new Set(readFileSync(join(modulesDir, 'modules.builtin'), 'utf8').split('\n').filter(Boolean).map(moduleName));
  const deps = new Map<string, { file: string; deps: string[] }>();
  for (const line of readFileSync(join(modulesDir, 'modules.dep'), 'utf8').split('\n')) {
    const colon = line.indexOf(':');
    if (colon < 0) continue;
    const file = line.slice(0, colon);
    deps.set(moduleName(file), { file, deps: line.slice(colon + 1).trim().split(/\s+/).filter(Boolean).map(moduleName) });
  }
  const order: string[] = [];
  const visit = (name: string, from: string) => {
    if (order.includes(name)) return;
    const entry = deps.get(name);
    if (!entry) throw new Error(`module ${name} (needed by ${from}) is neither built into kernel ${modulesDir} nor in its modules.dep`);
    for (const dep of entry.deps) visit(dep, name);
    if (!/\.ko$/.test(entry.file)) throw new Error(`module ${entry.file}: only uncompressed modules are supported (busybox insmod)`);
    order.push(name);
  };
  for (const name of WANTED_MODULES) if (!builtin.has(name)) visit(name, 'the guest');
  return order.map((name) => join(modulesDir, deps.get(name)!.file));
}

/** The guest's /init (busybox sh). `modules`: the names to insmod from /lib/modules, in order. */
function initScript(modules: string[]): string {
  return `#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "vhdvault-guest: $*"; }
fail() { echo "${FAILED} $*"; sleep 1; poweroff -f; }
arg() { for w in $(cat /proc/cmdline); do case "$w" in "vhdvault.$1="*) echo "\${w#*=}";; esac; done; }
disks=$(arg disks)
writer=$(arg writer)
agent=$(arg agent)
latency=$(arg latency)

for m in ${modules.join(' ')}; do insmod /lib/modules/$m.ko || fail "insmod $m"; done

# The disks: all of them present, then each mounted under its serial (the host's device id).
i=0
while [ "$(ls /sys/block | grep -c '^vd')" -lt "\${disks:-0}" ]; do
  i=$((i+1)); [ $i -le 200 ] || fail "only $(ls /sys/block | grep '^vd' | tr '\\n' ' ')of \${disks} disks appeared"
  usleep 50000
done
mounted=
for b in /sys/block/vd*; do
  [ -e "$b" ] || continue
  dev=\${b##*/}
  name=$(cat "$b/serial" 2>/dev/null)
  [ -n "$name" ] || name=$dev
  mkdir -p "/mnt/$name"
  if mount -t ext4 "/dev/$dev" "/mnt/$name"; then
    mounted="$mounted $name"
  else
    say "/dev/$dev ($name) is not ext4: not mounted"
    rmdir "/mnt/$name"
  fi
done

# The guest agent, on the port named ${AGENT_PORT} (its name arrives from the host after the port),
# unless the host gave it none (vhdvault.agent=0).
port=
i=0
while [ "$agent" != 0 ] && [ -z "$port" ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = ${AGENT_PORT} ] && port=/dev/\${p##*/}
  done
  [ -n "$port" ] && [ -e "$port" ] && break
  port=
  i=$((i+1)); [ $i -le 200 ] || fail "no virtio port named ${AGENT_PORT}"
  usleep 50000
done
[ -z "$port" ] || qemu-ga -m virtio-serial -p "$port" -d -t /run -f /run/qemu-ga.pid || fail "qemu-ga exited with $?"
i=0
while [ -n "$port" ] && [ ! -s /run/qemu-ga.pid ]; do
  i=$((i+1)); [ $i -le 200 ] || fail "qemu-ga wrote no pid file"
  usleep 50000
done

# The writer: the same increasing counter on every disk, then sync, many times a second.
# Each counter is written beside and renamed over the last: a freeze or a power cut
# between the truncate and the write of a plain "echo >" would leave it empty.
# The first round is done before the guest says it is ready, so every counter exists.
# With vhdvault.latency=1, each later round's start and end (the shell's clock, in
# microseconds: busybox's date has no %N) go to the console as a ${ROUND} line.
count() {
  for d in $mounted; do echo $1 > "/mnt/$d/counter.new" && mv "/mnt/$d/counter.new" "/mnt/$d/counter"; done
  sync
}
if [ "$writer" = 1 ]; then
  count 1
  (
    n=1
    while :; do
      n=$((n+1))
      if [ "$latency" = 1 ]; then
        t0=$EPOCHREALTIME
        count $n
        echo "${ROUND} $n $t0 $EPOCHREALTIME" >/dev/console
      else
        count $n
      fi
      usleep 50000
    done
  ) </dev/null >/dev/null 2>&1 &
  say "writer started (pid $!)"
fi

echo "${READY} mounted=$(echo $mounted | tr ' ' ,) agent=$port"
while :; do sleep 3600; done
`;
}

// newc cpio (the kernel's initramfs format): 13 hexadecimal fields after the magic, name and data padded to 4 bytes.
type Entry = { path: string; mode: number; data?: Buffer; rdev?: [number, number] };
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFCHR = 0o020000;

function cpio(entries: Entry[]): Buffer {
  const parts: Buffer[] = [];
  const pad = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  const add = (ino: number, { path, mode, data = Buffer.alloc(0), rdev = [0, 0] }: Entry) => {
    const name = Buffer.from(`${path}\0`);
    const fields = [ino, mode, 0, 0, mode & S_IFDIR ? 2 : 1, 0, data.length, 0, 0, rdev[0], rdev[1], name.length, 0];
    const header = Buffer.from(`070701${fields.map((f) => f.toString(16).padStart(8, '0')).join('')}`);
    parts.push(header, name, pad(header.length + name.length), data, pad(data.length));
  };
  entries.forEach((e, i) => add(i + 1, e));
  add(0, { path: 'TRAILER!!!', mode: 0 });
  return Buffer.concat(parts);
}

interface Recipe {
  key: string;
  entries: () => Entry[];
}

/** What goes into the initramfs, and a key over all of it: the kernel version, the init script, and the size and time of every file copied. */
function recipe(): Recipe {
  const { version, modules: modulesDir } = kernel!;
  const modules = moduleFiles(modulesDir);
  const init = initScript(modules.map(moduleName));
  // Each file at the path the guest looks for it (ldd's names), with the content of what that path resolves to here.
  const files = new Map<string, string>([
    [BUSYBOX, BUSYBOX],
    [QEMU_GA, QEMU_GA],
  ]);
  for (const binary of [BUSYBOX, QEMU_GA]) for (const lib of libraries(binary)) files.set(lib, lib);
  for (const m of modules) files.set(`/lib/modules/${moduleName(m)}.ko`, m);
  const hash = createHash('sha256').update(`vhdvault guest 1\n${version}\n${init}\n`);
  for (const [to, from] of [...files].sort()) {
    const s = statSync(realpathSync(from));
    hash.update(`${to} ${s.size} ${s.mtimeMs}\n`);
  }
  return {
    key: `${version}-${hash.digest('hex').slice(0, 16)}`,
    entries: () => {
      const dirs = new Set(['dev', 'proc', 'sys', 'run', 'tmp', 'mnt', 'root', 'etc', 'bin', 'sbin', 'usr', 'usr/bin', 'usr/sbin', 'lib', 'lib/modules']);
      for (const to of files.keys()) {
        const parts = to.split('/').filter(Boolean);
        for (let i = 1; i < parts.length; i++) dirs.add(parts.slice(0, i).join('/'));
      }
      return [
        ...[...dirs].sort().map((path) => ({ path, mode: S_IFDIR | 0o755 })),
        { path: 'dev/console', mode: S_IFCHR | 0o600, rdev: [5, 1] as [number, number] },
        { path: 'init', mode: S_IFREG | 0o755, data: Buffer.from(init) },
        ...[...files].map(([to, from]) => ({ path: to.slice(1), mode: S_IFREG | 0o755, data: readFileSync(realpathSync(from)) })),
      ];
    },
  };
}

export interface Initramfs {
  path: string;
  /** Whether this call built it (else it was in the cache). */
  built: boolean;
  /** How long this call took. */
  ms: number;
}

let initramfs: Promise<Initramfs> | undefined;

/** The guest's initramfs: from the cache, else built now (once per process; atomically against other processes). */
export function guestInitramfs(): Promise<Initramfs> {
  initramfs ??= buildInitramfs();
  return initramfs;
}

const WEEK_MS = 7 * 24 * 3600 * 1000;

async function buildInitramfs(): Promise<Initramfs> {
  if (guestMissing !== undefined) throw new Error(guestMissing);
  const started = Date.now();
  const { key, entries } = recipe();
  const root = guestCacheRoot();
  const dir = join(root, `guest-${key}`);
  const path = join(dir, 'initrd.img');
  if (existsSync(path)) {
    // Used now: kept by the clean-up below (of images nobody used for a week).
    await utimes(dir, new Date(), new Date()).catch(() => undefined);
    return { path, built: false, ms: Date.now() - started };
  }
  await mkdir(root, { recursive: true });
  const temp = await mkdtemp(join(root, '.building-'));
  try {
    await writeFile(join(temp, 'initrd.img'), gzipSync(cpio(entries()), { level: 6 }));
    await writeFile(join(temp, 'key'), `${key}\n`);
    // (mkdtemp made it private: a QEMU run as another user, libvirt's, must read it too.)
    await chmod(temp, 0o755);
    try {
      await rename(temp, dir);
    } catch (err) {
      // Another process renamed its copy first: use that one.
      if (!['ENOTEMPTY', 'EEXIST'].includes((err as NodeJS.ErrnoException).code ?? '')) throw err;
    }
  } finally {
    await rm(temp, { recursive: true, force: true });
  }
  // Images of other package versions nobody used for a week, and builds abandoned an hour ago.
  for (const name of await readdir(root)) {
    if (join(root, name) === dir) continue;
    const age = Date.now() - (await stat(join(root, name)).catch(() => ({ mtimeMs: Date.now() }))).mtimeMs;
    if ((name.startsWith('guest-') && age > WEEK_MS) || (name.startsWith('.building-') && age > 3600_000)) await rm(join(root, name), { recursive: true, force: true });
  }
  return { path, built: true, ms: Date.now() - started };
}

// ---------------------------------------------------------------------------
// Disks

const QCOW2_MAGIC = Buffer.from('QFI\xfb', 'latin1');

/** An image's format, told by its first bytes: qcow2 or raw. */
export async function imageFormat(image: string): Promise<'qcow2' | 'raw'> {
  const fh = await open(image, 'r');
  try {
    const head = Buffer.alloc(4);
    await fh.read(head, 0, 4, 0);
    return head.equals(QCOW2_MAGIC) ? 'qcow2' : 'raw';
  } finally {
    await fh.close();
  }
}

/**
 * A new disk at `path` of `sizeMiB` MiB holding an empty ext4 filesystem
 * (mkfs.ext4 on a host file, its inode tables and journal written now, so the
 * guest's kernel has no lazy initialization to do in the background). A qcow2
 * image when `format` says so, or by default when the path ends in .qcow2:
 * made raw, then converted. With `from`, the filesystem holds a copy of that
 * host folder's files (mkfs.ext4 -d).
 */
export async function makeExt4Disk(path: string, sizeMiB: number, format: 'raw' | 'qcow2' = path.endsWith('.qcow2') ? 'qcow2' : 'raw', options: { from?: string } = {}): Promise<void> {
  const raw = format === 'raw' ? path : `${path}.raw-${randomBytes(4).toString('hex')}`;
  try {
    const fh = await open(raw, 'wx');
    await fh.truncate(sizeMiB * 1024 * 1024);
    await fh.close();
    await execFileAsync(MKFS!, ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', ...(options.from === undefined ? [] : ['-d', options.from]), raw]);
    if (format === 'qcow2') await execFileAsync('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, path]);
  } finally {
    if (raw !== path) await rm(raw, { force: true });
  }
}

/**
 * `fn` with a raw view of `image`: the image itself when raw, else a raw copy
 * (qemu-img convert with -U, since a running QEMU holds a lock on the image),
 * removed afterwards. Of a running guest's disk, a copy is only consistent
 * while the guest is frozen.
 */
export async function withRaw<T>(image: string, fn: (raw: string) => Promise<T>): Promise<T> {
  if ((await imageFormat(image)) === 'raw') return fn(image);
  const dir = await mkdtemp(join(tmpdir(), 'vhdvault-guest-raw-'));
  try {
    const raw = join(dir, 'disk.raw');
    await execFileAsync('qemu-img', ['convert', '-U', '-q', '-f', 'qcow2', '-O', 'raw', image, raw]);
    return await fn(raw);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** A file's content in the ext4 filesystem of a raw image (debugfs), read from the host. */
export async function ext4Cat(raw: string, file: string): Promise<string> {
  const { stdout } = await execFileAsync(DEBUGFS!, ['-R', `cat ${file}`, raw]);
  return stdout;
}

/** Runs a program to its end: its exit code (-1 for a signal) and what it printed on stdout and stderr. */
function exitCode(command: string, args: string[]): Promise<{ code: number; output: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (output += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (output += d));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code: code ?? -1, output: output.trim() }));
  });
}

/**
 * Replays the journal of the ext4 filesystem in a raw image, if it needs it,
 * as mounting it would (after a power cut): `e2fsck -E journal_only`, which
 * changes nothing else. Throws if e2fsck fails.
 */
export async function replayJournal(raw: string): Promise<void> {
  const r = await exitCode(E2FSCK!, ['-E', 'journal_only', '-p', raw]);
  // 0: nothing to do, or replayed (1 would be: replayed and corrected).
  if (r.code !== 0 && r.code !== 1) throw new Error(`e2fsck -E journal_only ${raw} exited ${r.code}: ${r.output}`);
}

/** `e2fsck -fn` of a raw image: its exit code and output (0: clean). */
export async function e2fsck(raw: string): Promise<{ code: number; output: string }> {
  return exitCode(E2FSCK!, ['-fn', raw]);
}

// ---------------------------------------------------------------------------
// The VM

export interface GuestDisk {
  image: string;
  format: 'qcow2' | 'raw';
  /** The virtio-blk device's id (and its serial: the guest mounts it at /mnt/<device>). */
  device: string;
  /** The format node under the device (file node f<i> below it). */
  node: string;
}

export interface Guest {
  disks: GuestDisk[];
  /** A QMP monitor for vhdvault (a monitor serves one client at a time). */
  qmpSocket: string;
  /** The test's own monitor, connected. */
  testQmp: QmpClient;
  /** The host end of the guest agent's virtio-serial port. */
  qgaSocket: string;
  /** Everything the guest printed on its serial console so far. */
  console(): string;
  /** From QEMU's start to the ready line. */
  bootMs: number;
  /** kvm when /dev/kvm is usable, else tcg. */
  accel: 'kvm' | 'tcg';
  initramfs: Initramfs;
  /** SIGKILL to QEMU (a power cut for the guest); resolves once it exited. */
  kill(): Promise<void>;
}

export interface GuestOptions {
  /** Images made by the test (raw or qcow2, ext4 inside; makeExt4Disk), attached as vda, vdb, … */
  disks: string[];
  /** Start the counter writer. */
  writer?: boolean;
  /** With the writer: print each round's start and end on the console (writerRounds reads them). */
  latency?: boolean;
  /** How long the boot may take; default 120 s (a boot takes about 5 s with TCG on an idle machine). */
  bootTimeoutMs?: number;
  /** Guest memory, MiB; default 256. */
  memoryMiB?: number;
}

const running = new Set<ChildProcess>();
const dirs: string[] = [];

/** Kills every guest this process booted and removes their folders (sockets): after a test file (guest.ts), or at a bench's end. */
/** Once a server accepts connections on the Unix socket (QEMU makes it when it is ready). */
async function listening(socket: string, withinMs = 10_000): Promise<void> {
  const deadline = Date.now() + withinMs;
  while ((await socketState(socket)) !== 'listening') {
    if (Date.now() > deadline) throw new Error(`nothing accepts connections on ${socket} after ${withinMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export async function stopGuests(): Promise<void> {
  await Promise.all([...running].map((child) => killChild(child)));
  await Promise.all(dirs.splice(0).map((dir) => rm(dir, { recursive: true, force: true })));
}

async function killChild(child: ChildProcess): Promise<void> {
  running.delete(child);
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGKILL');
  await gone;
}


/** The cloud kernel the guest boots (only when guestMissing is undefined). */
export function guestKernel(): string {
  if (kernel === null) throw new Error(guestMissing);
  return kernel.image;
}

/** The kernel's command line: how many disks the init waits for, whether it starts the writer (timing its rounds) and the agent. */
export function guestCommandLine(o: { disks: number; writer: boolean; agent: boolean; latency?: boolean }): string {
  const words = ['console=ttyS0', 'quiet', 'panic=1', `vhdvault.disks=${o.disks}`, `vhdvault.writer=${o.writer ? 1 : 0}`, `vhdvault.agent=${o.agent ? 1 : 0}`];
  return [...words, ...(o.latency ? ['vhdvault.latency=1'] : [])].join(' ');
}

/** One round of the writer (every counter written, then sync), as the guest timed it: microseconds of its clock. */
export interface WriterRound {
  n: number;
  startUs: number;
  endUs: number;
}

/** The ROUND lines in console text (vhdvault.latency=1), whole lines only. */
export function writerRounds(text: string): WriterRound[] {
  const us = (t: string) => {
    const [s, f = ''] = t.split('.');
    return Number(s) * 1e6 + Number(f.padEnd(6, '0').slice(0, 6));
  };
  const rounds: WriterRound[] = [];
  for (const m of text.matchAll(new RegExp(`${ROUND} (\\d+) (\\d+\\.\\d+) (\\d+\\.\\d+)\\r?\\n`, 'g'))) rounds.push({ n: Number(m[1]), startUs: us(m[2]!), endUs: us(m[3]!) });
  return rounds;
}

export const deviceId = (i: number) => `vd${String.fromCharCode(97 + i)}`;
export const tail = (text: string, n = 3000) => (text.length > n ? `…${text.slice(-n)}` : text).trim() || '(nothing)';

/** Boots the guest over `disks` and waits for its ready line: every disk mounted, the agent running. */
export async function bootGuest(options: GuestOptions): Promise<Guest> {
  if (options.disks.length > 26) throw new Error('at most 26 disks (vda…vdz)');
  const image = await guestInitramfs();
  const dir = await mkdtemp(join(tmpdir(), 'vhdvault-guest-'));
  dirs.push(dir);
  const disks: GuestDisk[] = [];
  for (const [i, img] of options.disks.entries()) disks.push({ image: img, format: await imageFormat(img), device: deviceId(i), node: `disk${i}` });
  const qmpSocket = join(dir, 'qmp.sock');
  const testSocket = join(dir, 'qmp-test.sock');
  const qgaSocket = join(dir, 'qga.sock');
  const kvm = kvmUsable();
  const append = guestCommandLine({ disks: disks.length, writer: options.writer ?? false, agent: true, latency: options.latency });
  const args = [
    ...['-M', 'q35', '-accel', kvm ? 'kvm' : 'tcg', ...(kvm ? ['-cpu', 'host'] : []), '-m', String(options.memoryMiB ?? 256), '-smp', '1'],
    ...['-nodefaults', '-nographic', '-no-reboot', '-serial', 'stdio'],
    ...['-kernel', kernel!.image, '-initrd', image.path, '-append', append],
    ...disks.flatMap((d, i) => [
      ...['-blockdev', `driver=file,node-name=f${i},filename=${d.image}`],
      ...['-blockdev', `driver=${d.format},node-name=${d.node},file=f${i}`],
      ...['-device', `virtio-blk-pci,drive=${d.node},id=${d.device},serial=${d.device}`],
    ]),
    ...['-chardev', `socket,path=${qgaSocket},server=on,wait=off,id=qga0`],
    ...['-device', 'virtio-serial-pci,id=vser0', '-device', `virtserialport,bus=vser0.0,chardev=qga0,name=${AGENT_PORT}`],
    ...['-chardev', `socket,path=${qmpSocket},server=on,wait=off,id=m0`, '-mon', 'chardev=m0,mode=control'],
    ...['-chardev', `socket,path=${testSocket},server=on,wait=off,id=m1`, '-mon', 'chardev=m1,mode=control'],
  ];
  const started = Date.now();
  const child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  running.add(child);
  let text = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8');
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const timeoutMs = options.bootTimeoutMs ?? 120_000;
  try {
    const ready = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the guest printed no ${READY} line within ${timeoutMs / 1000} s; its console showed:\n${tail(text)}`)), timeoutMs);
      let settled = false;
      child.stdout!.on('data', (d: string) => {
        text += d;
        if (settled) return;
        // A whole line: the serial console's output arrives in pieces.
        const line = new RegExp(`(?:${READY}|${FAILED})[^\\r\\n]*(?=\\r?\\n)`).exec(text)?.[0];
        if (line === undefined) return;
        settled = true;
        clearTimeout(timer);
        if (line.startsWith(FAILED)) reject(new Error(`the guest failed to start: ${line}; its console showed:\n${tail(text)}`));
        else resolve(line);
      });
      child.once('error', (err) => {
        clearTimeout(timer);
        reject(err);
      });
      child.once('exit', (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`qemu-system-x86_64 exited (${code ?? signal}) before the guest was ready: ${stderr.trim()}\nits console showed:\n${tail(text)}`));
      });
    });
    const mounted = /mounted=(\S*)/.exec(ready)?.[1]?.split(',').filter(Boolean) ?? [];
    const unmounted = disks.filter((d) => !mounted.includes(d.device)).map((d) => `${d.device} (${d.image})`);
    if (unmounted.length) throw new Error(`the guest did not mount ${unmounted.join(', ')} (ext4 expected: makeExt4Disk); its console showed:\n${tail(text)}`);
    const bootMs = Date.now() - started;
    await Promise.all([listening(qmpSocket), listening(testSocket)]);
    const testQmp = await QmpClient.connect(testSocket);
    return {
      disks,
      qmpSocket,
      testQmp,
      qgaSocket,
      console: () => text,
      bootMs,
      accel: kvm ? 'kvm' : 'tcg',
      initramfs: image,
      kill: async () => {
        await killChild(child);
        await testQmp.close();
      },
    };
  } catch (err) {
    await killChild(child);
    throw err;
  }
}
