/**
 * The real Linux guest of guest.ts as a libvirt domain: the same kernel,
 * initramfs and ext4 disks, defined (persistent, so its checkpoints outlive
 * a shutdown) and started through virsh on the libvirtd that
 * VHDVAULT_TEST_LIBVIRT names (default qemu:///system). Its disks are
 * virtio vda, vdb, … with each target as serial (the init mounts a disk at
 * /mnt/<serial>), the guest agent on libvirt's own channel, and a serial
 * console into a file polled for the ready line. Every domain defined here
 * is destroyed and undefined after the test file; those a killed test run
 * left (its pid is in their name) by the next one that defines a domain.
 *
 * Outside CI the tests are skipped (libvirtSkip) when libvirtd does not
 * answer; under CI (.ci/run starts it) that is an error.
 */
import { execFile, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, rmdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll } from 'vitest';
import { AGENT_PORT, deviceId, FAILED, guestCommandLine, guestInitramfs, guestKernel, guestSkip, READY, tail } from './guest.js';

const execFileAsync = promisify(execFile);

/** The libvirt the tests use. */
export const LIBVIRT = process.env.VHDVAULT_TEST_LIBVIRT || 'qemu:///system';
const PREFIX = 'vhdvault-test-';

function unreachable(): string | undefined {
  const r = spawnSync('virsh', ['-c', LIBVIRT, 'version'], { encoding: 'utf8', timeout: 15_000 });
  if (r.error) return (r.error as NodeJS.ErrnoException).code === 'ENOENT' ? 'no virsh here (Debian libvirt-clients)' : `virsh: ${r.error.message}`;
  if (r.status !== 0) return `libvirtd does not answer on ${LIBVIRT}: ${r.stderr.trim().split('\n').at(-1) ?? ''}`;
  return undefined;
}

/** Why the libvirt tests cannot run here (outside CI only), else undefined: for describe.skipIf. */
export const libvirtSkip = guestSkip ?? unreachable();
if (libvirtSkip !== undefined && process.env.CI) throw new Error(`${libvirtSkip} (CI must install and start libvirtd: .ci/run)`);

/** A suite's title, with the reason when it is skipped. */
export const libvirtTitle = (name: string) => (libvirtSkip === undefined ? name : `${name} [skipped: ${libvirtSkip}]`);

// Test files share libvirtd, and one test restarts it: every file holding libvirtd shares it
// (a file in HOLDS from its import to its end); the restart test holds it alone (EXCLUSIVE, once
// the other files' holds are gone), and files that start meanwhile wait for it.
const HOLDS = join(tmpdir(), 'vhdvault-libvirt-holds');
const EXCLUSIVE = join(HOLDS, 'exclusive');
const me = `shared-${process.pid}-${randomBytes(4).toString('hex')}`;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function holdShared(): Promise<void> {
  for (;;) {
    await mkdir(HOLDS, { recursive: true });
    await writeFile(join(HOLDS, me), '');
    if (!existsSync(EXCLUSIVE)) return;
    await rm(join(HOLDS, me), { force: true });
    await sleep(200);
  }
}

async function releaseShared(): Promise<void> {
  await rm(join(HOLDS, me), { force: true });
  await rmdir(HOLDS).catch(() => undefined); // the last one out
}

/** Run `fn` with libvirtd to this file alone (other files' holds gone, new ones waiting). */
export async function withLibvirtAlone<T>(fn: () => Promise<T>): Promise<T> {
  await mkdir(HOLDS, { recursive: true });
  await writeFile(EXCLUSIVE, '', { flag: 'wx' });
  try {
    for (let i = 0; ; i++) {
      const others = (await readdir(HOLDS)).filter((n) => n.startsWith('shared-') && n !== me);
      if (others.length === 0) break;
      if (i > 3000) throw new Error(`libvirtd still shared after 600 s: ${others.join(', ')}`);
      await sleep(200);
    }
    return await fn();
  } finally {
    await rm(EXCLUSIVE, { force: true });
  }
}

if (libvirtSkip === undefined) await holdShared();

export interface LibvirtGuestOptions {
  /** qcow2 images with ext4 inside (makeExt4Disk), attached as vda, vdb, … */
  disks: string[];
  /** Start the counter writer. */
  writer?: boolean;
  /** Give the domain the guest agent channel (and start qemu-ga); default true. */
  agent?: boolean;
  bootTimeoutMs?: number;
}

export interface LibvirtGuest {
  name: string;
  connect: string;
  disks: Array<{ target: string; image: string }>;
  /** The file the guest's serial console goes to. */
  console: string;
  /** From `virsh start` to the ready line. */
  bootMs: number;
  /** Destroy (when running) and undefine, checkpoints' metadata included; again is a no-op. */
  shutdown(): Promise<void>;
  /** Destroy only, gracefully (QEMU is sent SIGTERM, never SIGKILL, so it stores its persistent bitmaps): the domain stays defined, shut off. */
  powerOff(): Promise<void>;
}

const virsh = async (...args: string[]) => (await execFileAsync('virsh', ['-q', '-c', LIBVIRT, ...args], { timeout: 60_000 })).stdout;

const defined: LibvirtGuest[] = [];
const dirs: string[] = [];
afterAll(async () => {
  await Promise.all(defined.splice(0).map((g) => g.shutdown()));
  await Promise.all(dirs.splice(0).map((dir) => rm(dir, { recursive: true, force: true })));
  await releaseShared();
});

/** Destroy and undefine, each tolerated when already done. */
async function remove(name: string): Promise<void> {
  await virsh('destroy', name).catch(() => undefined);
  await virsh('undefine', name, '--checkpoints-metadata').catch((err: { stderr?: string }) => {
    if (!/failed to get domain|Domain not found/i.test(err.stderr ?? '')) throw err;
  });
}

let swept = false;

/** Domains a killed test run left: named after its pid, which is gone. */
async function sweepLeftovers(): Promise<void> {
  if (swept) return;
  swept = true;
  for (const name of (await virsh('list', '--all', '--name')).split('\n').map((l) => l.trim())) {
    const pid = Number(new RegExp(`^${PREFIX}(\\d+)-`).exec(name)?.[1] ?? NaN);
    if (!Number.isSafeInteger(pid) || pid === process.pid) continue;
    try {
      process.kill(pid, 0);
    } catch {
      await remove(name);
    }
  }
}

const attr = (s: string) => s.replace(/[&<>'"]/g, (c) => `&#${c.charCodeAt(0)};`);

function domainXml(name: string, o: LibvirtGuestOptions, kernel: string, initrd: string, consoleFile: string): string {
  const agent = o.agent ?? true;
  const disks = o.disks.map((image, i) => {
    const target = deviceId(i);
    return `<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${attr(image)}'/><target dev='${target}' bus='virtio'/><serial>${target}</serial></disk>`;
  });
  return `<domain type='qemu'>
  <name>${name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>${attr(kernel)}</kernel>
    <initrd>${attr(initrd)}</initrd>
    <cmdline>${guestCommandLine({ disks: o.disks.length, writer: o.writer ?? false, agent })}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    ${disks.join('\n    ')}
    ${agent ? `<channel type='unix'><source mode='bind'/><target type='virtio' name='${AGENT_PORT}'/></channel>` : ''}
    <serial type='file'><source path='${attr(consoleFile)}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
`;
}

/** Defines and starts a domain over `disks`, and waits for the guest's ready line. */
export async function defineGuest(o: LibvirtGuestOptions): Promise<LibvirtGuest> {
  if (o.disks.length > 26) throw new Error('at most 26 disks (vda…vdz)');
  await sweepLeftovers();
  const initramfs = await guestInitramfs();
  const dir = await mkdtemp(join(tmpdir(), 'vhdvault-libvirt-'));
  dirs.push(dir);
  const name = `${PREFIX}${process.pid}-${randomBytes(4).toString('hex')}`;
  const consoleFile = join(dir, 'console.log');
  const xmlFile = join(dir, 'domain.xml');
  await writeFile(xmlFile, domainXml(name, o, guestKernel(), initramfs.path, consoleFile));
  let removed: Promise<void> | null = null;
  const guest: LibvirtGuest = {
    name,
    connect: LIBVIRT,
    disks: o.disks.map((image, i) => ({ target: deviceId(i), image })),
    console: consoleFile,
    bootMs: 0,
    shutdown: () => (removed ??= remove(name)),
    powerOff: async () => void (await virsh('destroy', '--graceful', name)),
  };
  await virsh('define', xmlFile);
  defined.push(guest);
  const started = Date.now();
  try {
    await virsh('start', name);
    const ready = await readyLine(name, consoleFile, o.bootTimeoutMs ?? 120_000);
    const mounted = /mounted=(\S*)/.exec(ready)?.[1]?.split(',').filter(Boolean) ?? [];
    const unmounted = guest.disks.filter((d) => !mounted.includes(d.target)).map((d) => `${d.target} (${d.image})`);
    if (unmounted.length) throw new Error(`the guest did not mount ${unmounted.join(', ')} (ext4 expected: makeExt4Disk); its console showed:\n${tail(await readFile(consoleFile, 'utf8'))}`);
  } catch (err) {
    await guest.shutdown();
    throw err;
  }
  guest.bootMs = Date.now() - started;
  return guest;
}

/** The ready line on the console file, polled; an error with the console's tail on failure, timeout, or a domain that stopped. */
async function readyLine(name: string, consoleFile: string, timeoutMs: number): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (let round = 0; ; round++) {
    const text = await readFile(consoleFile, 'utf8').catch(() => '');
    const line = new RegExp(`(?:${READY}|${FAILED})[^\\r\\n]*(?=\\r?\\n)`).exec(text)?.[0];
    if (line?.startsWith(READY)) return line;
    if (line !== undefined) throw new Error(`the guest failed to start: ${line}; its console showed:\n${tail(text)}`);
    if (Date.now() > deadline) throw new Error(`the guest printed no ${READY} line within ${timeoutMs / 1000} s; its console showed:\n${tail(text)}`);
    if (round % 10 === 9 && (await virsh('domstate', name)).trim() !== 'running') throw new Error(`domain ${name} stopped before the guest was ready; its console showed:\n${tail(text)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
