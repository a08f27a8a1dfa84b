// vitest: slow (boots a real Linux guest; started first on a fresh checkout, see vitest.config.ts)
/**
 * `vm restore` and `vm boot-check` of a VM backup of a real two-disk Linux
 * guest (its writer puts the same counter on both disks): restored as qcow2,
 * raw and VHD, each disk is a clean ext4 with counters within one, and the
 * definition names the restored files; nothing is ever overwritten. The
 * backup boots without being restored (the agent answers, or the console
 * shows the ready line), and a damaged block of one disk fails the check
 * naming that disk, leaving nothing behind. A libvirt VM backup boots from
 * its domain XML's kernel, and restored with `--define` becomes a new domain
 * (new name, UUID and MACs), when a libvirtd answers at qemu:///system.
 */
import { execFile, spawn, spawnSync } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { mkdir, open, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { BootCheckResult } from '../src/live/bootCheck.js';
import { newBackupId } from '../src/store/names.js';
import { Repository } from '../src/store/repository.js';
import { writeVmRecord } from '../src/store/vmRecord.js';
import { CLI, cliEnv, vhdvaultAsync } from './helpers/cli.js';
import { tempDir } from './helpers/files.js';
import { bootGuest, e2fsck, ext4Cat, type Guest, guestInitramfs, guestSkip, guestTitle, makeExt4Disk } from './helpers/guest.js';
import { LIBVIRT, libvirtSkip, libvirtTitle } from './helpers/libvirt.js';

const run = promisify(execFile);

interface RestoreReport {
  vm: string;
  id: string;
  dir: string;
  disks: Record<string, { path: string; format: string; bytes: number }>;
  definition: string;
  defined: string | null;
}

type BootReport = BootCheckResult;

/** A raw copy of a restored image (qemu-img for qcow2 and VHD), for e2fsck and debugfs. */
async function asRaw(path: string, format: string, dir: string): Promise<string> {
  if (format === 'raw') return path;
  const raw = join(dir, `check-${randomBytes(4).toString('hex')}.raw`);
  await run('qemu-img', ['convert', '-q', '-f', format === 'vhd' ? 'vpc' : format, '-O', 'raw', path, raw]);
  return raw;
}

async function listing(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const name of (await readdir(dir)).sort()) {
    const s = await stat(join(dir, name));
    out.push(`${name} ${s.size} ${s.mtimeMs}`);
  }
  return out;
}

/** A file's text, or null when it cannot be read (a process gone meanwhile). */
function readFileSafe(path: string): string | null {
  try {
    return readFileSync(path, 'latin1');
  } catch {
    return null;
  }
}

describe.skipIf(guestSkip !== undefined)(guestTitle('vm restore and vm boot-check of a two-disk guest'), () => {
  let dir: string;
  let guest: Guest | undefined;
  let repo: string;
  let id: string;

  beforeAll(async () => {
    dir = await tempDir('vhdvault-vmrestore-');
    const images = [join(dir, 'vda.qcow2'), join(dir, 'vdb.raw')];
    for (const image of images) await makeExt4Disk(image, 32);
    guest = await bootGuest({ disks: images, writer: true });
    repo = join(dir, 'repo');
    expect((await vhdvaultAsync('init', repo)).code).toBe(0);
    const r = await vhdvaultAsync('vm', 'backup', repo, 'web', '--qemu', guest.qmpSocket, '--qga', guest.qgaSocket, '--json');
    expect(r.code, r.stderr).toBe(0);
    id = (JSON.parse(r.stdout) as { id: string }).id;
    await guest.kill();
    guest = undefined;
  });
  afterAll(async () => {
    await guest?.kill();
  });

  for (const format of ['qcow2', 'raw', 'vhd'] as const) {
    it(`restores every disk as ${format}: clean ext4, counters within one, the definition naming them`, async () => {
      const out = join(dir, `out-${format}`);
      const args = format === 'qcow2' ? [] : ['--format', format];
      const r = await vhdvaultAsync('vm', 'restore', repo, 'web', out, ...args, '--json');
      expect(r.code, r.stderr).toBe(0);
      const report = JSON.parse(r.stdout) as RestoreReport;
      expect(report).toMatchObject({ vm: 'web', id, dir: out, definition: join(out, 'web.json'), defined: null });
      expect(Object.keys(report.disks).sort()).toEqual(['vda', 'vdb']);
      const counters: number[] = [];
      for (const [target, d] of Object.entries(report.disks)) {
        expect(d.path).toBe(join(out, `web.${target}.${format}`));
        expect(d.format).toBe(format);
        expect(d.bytes).toBe((await stat(d.path)).size);
        const info = JSON.parse((await run('qemu-img', ['info', '--output=json', d.path])).stdout) as { format: string; 'virtual-size': number };
        expect(info.format).toBe(format === 'vhd' ? 'vpc' : format);
        expect(info['virtual-size']).toBeGreaterThanOrEqual(32 * 1024 * 1024);
        const raw = await asRaw(d.path, format, dir);
        const fsck = await e2fsck(raw);
        expect(fsck.code, `${target}: ${fsck.output}`).toBe(0);
        counters.push(Number.parseInt(await ext4Cat(raw, '/counter'), 10));
      }
      expect(Math.abs(counters[0]! - counters[1]!), `counters ${counters}`).toBeLessThanOrEqual(1);
      // Nothing else in the folder: no temporary file left.
      expect((await readdir(out)).sort()).toEqual(['web.json', 'web.sh', `web.vda.${format}`, `web.vdb.${format}`]);
      const definition = JSON.parse(await readFile(report.definition, 'utf8')) as { id: string; definition: { kind: string; disks: Array<{ target: string; file: string; format: string }> } };
      expect(definition.id).toBe(id);
      expect(definition.definition.disks.map((d) => [d.target, d.file, d.format])).toEqual([
        ['vda', report.disks.vda!.path, format === 'vhd' ? 'vpc' : format],
        ['vdb', report.disks.vdb!.path, format === 'vhd' ? 'vpc' : format],
      ]);
      const script = await readFile(join(out, 'web.sh'), 'utf8');
      expect(script).toMatch(/^#!\/bin\/sh\n/);
      for (const d of Object.values(report.disks)) expect(script).toContain(`filename=${d.path}`);
      expect(script).toContain('-kernel /boot/vmlinuz-');
      expect((await stat(join(out, 'web.sh'))).mode & 0o111).not.toBe(0);
      expect(spawnSync('sh', ['-n', join(out, 'web.sh')]).status).toBe(0);
      console.log(`vm restore --format ${format}: counters ${counters}`);
      if (format === 'raw') {
        // The script boots the restored VM: the guest mounts both disks and says so.
        const ready = await bootsToReady(join(out, 'web.sh'));
        expect(ready).toMatch(/VHDVAULT-GUEST-READY mounted=vda,vdb/);
      }
    });
  }

  /** Runs a restore's script until the guest prints its ready line (or 120 s pass); then kills it. */
  function bootsToReady(script: string): Promise<string> {
    return new Promise((resolve, reject) => {
      const child = spawn('sh', [script], { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
      let text = '';
      let stderr = '';
      const stop = () => {
        clearTimeout(timer);
        if (child.exitCode === null) process.kill(-child.pid!, 'SIGKILL');
      };
      const timer = setTimeout(() => {
        stop();
        reject(new Error(`${script}: no ready line within 120 s: ${text.slice(-2000)} ${stderr}`));
      }, 120_000);
      child.stdout.setEncoding('utf8').on('data', (d: string) => {
        text += d;
        // A whole line: the console's output arrives in pieces.
        const line = /VHDVAULT-GUEST-(?:READY|FAILED)[^\r\n]*(?=\r?\n)/.exec(text)?.[0];
        if (line === undefined) return;
        stop();
        resolve(line);
      });
      child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
      child.once('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`${script} exited ${code}: ${stderr.trim()}`));
      });
    });
  }

  it('never overwrites: an existing file fails it with one line naming the file, nothing written', async () => {
    const out = join(dir, 'out-qcow2');
    const before = await listing(out);
    const again = await vhdvaultAsync('vm', 'restore', repo, 'web', out);
    expect(again.code, again.stderr).toBe(1);
    expect(again.stdout).toBe('');
    expect(again.stderr.trim().split('\n')).toHaveLength(1);
    expect(again.stderr).toContain(join(out, 'web.vda.qcow2'));
    expect(again.stderr).toMatch(/exists/);
    expect(await listing(out)).toEqual(before);
    // Only the definition's name taken: still nothing written beside it.
    const partial = join(dir, 'out-partial');
    await mkdir(partial);
    await writeFile(join(partial, 'web.sh'), 'mine\n');
    const p = await vhdvaultAsync('vm', 'restore', repo, 'web', partial, '--format', 'raw');
    expect(p.code).toBe(1);
    expect(p.stderr).toContain(join(partial, 'web.sh'));
    expect(await readdir(partial)).toEqual(['web.sh']);
    expect(await readFile(join(partial, 'web.sh'), 'utf8')).toBe('mine\n');
    // A folder whose parent is missing is not made.
    const deep = await vhdvaultAsync('vm', 'restore', repo, 'web', join(dir, 'no', 'such'));
    expect(deep.code).toBe(1);
    expect(deep.stderr).toMatch(/parent folder .* does not exist/);
    // --define is for libvirt VMs.
    const define = await vhdvaultAsync('vm', 'restore', repo, 'web', join(dir, 'out-define'), '--define', 'copy');
    expect(define.code).toBe(2);
    expect(define.stderr.trim().split('\n')).toHaveLength(1);
    expect(define.stderr).toMatch(/--define .* QEMU VM without libvirt/);
  });

  it('boot-check: the backup boots from its served disks and its agent answers; nothing left behind', async () => {
    const before = await vhdvaultAsync('list', repo, '--json');
    const r = await vhdvaultAsync('vm', 'boot-check', repo, 'web', '--json');
    expect(r.code, r.stderr).toBe(0);
    const report = JSON.parse(r.stdout) as BootReport;
    expect(report).toMatchObject({ vm: 'web', id, ok: true, by: 'agent' });
    expect(report.ms).toBeGreaterThan(0);
    console.log(`vm boot-check: the agent answered after ${report.ms} ms`);
    expect((await readdir(tmpdir())).filter((n) => n.startsWith('vhdvault-bootcheck-'))).toEqual([]);
    expect(await readdir(join(repo, 'overlays', 'web.vda')).catch(() => [])).toEqual([]);
    expect(await readdir(join(repo, 'overlays', 'web.vdb')).catch(() => [])).toEqual([]);
    expect((await vhdvaultAsync('list', repo, '--json')).stdout).toBe(before.stdout);
    const verify = await vhdvaultAsync('verify', repo);
    expect(verify.code, verify.stderr).toBe(0);
    // A person gets one line.
    const text = await vhdvaultAsync('vm', 'boot-check', repo, 'web', '--expect', 'VHDVAULT-GUEST-READY mounted=vda,vdb');
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout.trim().split('\n')).toHaveLength(1);
    expect(text.stdout).toMatch(new RegExp(`VM backup ${id} of web booted: its console matched after \\d+\\.\\d s`));
  });

  it('boot-check --expect: a console line that never comes fails after --timeout', async () => {
    const r = await vhdvaultAsync('vm', 'boot-check', repo, 'web', '--expect', 'NEVER-PRINTED', '--timeout', '3', '--json');
    expect(r.code).toBe(1);
    const report = JSON.parse(r.stdout) as BootReport;
    expect(report).toMatchObject({ ok: false, by: 'console' });
    expect(report.problem).toMatch(/did not answer within 3 s/);
  });

  it('boot-check: SIGTERM kills the VM and removes its overlays before exiting', async () => {
    const child = spawn(process.execPath, [CLI, 'vm', 'boot-check', repo, 'web', '--expect', 'NEVER-PRINTED'], { stdio: ['ignore', 'pipe', 'pipe'], env: cliEnv() });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    // Until the VM runs: its temporary folder holds the agent's socket.
    const running = async () => {
      for (const name of (await readdir(tmpdir())).filter((n) => n.startsWith('vhdvault-bootcheck-'))) if ((await readdir(join(tmpdir(), name)).catch((): string[] => [])).includes('qga.sock')) return true;
      return false;
    };
    for (let i = 0; i < 200 && !(await running()); i++) await new Promise((r) => setTimeout(r, 50));
    expect(await running()).toBe(true);
    child.kill('SIGTERM');
    expect(await exited, stderr).toBe(143);
    expect(stderr.trim()).toBe('vhdvault: interrupted');
    expect((await readdir(tmpdir())).filter((n) => n.startsWith('vhdvault-bootcheck-'))).toEqual([]);
  });

  it('boot-check killed with -9: its VM dies with it, and the next check removes the folder it left', async () => {
    const child = spawn(process.execPath, [CLI, 'vm', 'boot-check', repo, 'web', '--expect', 'NEVER-PRINTED'], { stdio: ['ignore', 'ignore', 'ignore'], env: cliEnv() });
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    const folders = async () => (await readdir(tmpdir())).filter((n) => n.startsWith('vhdvault-bootcheck-'));
    const running = async () => {
      for (const name of await folders()) if ((await readdir(join(tmpdir(), name)).catch((): string[] => [])).includes('qga.sock')) return name;
      return null;
    };
    let folder: string | null = null;
    for (let i = 0; i < 200 && !(folder = await running()); i++) await new Promise((r) => setTimeout(r, 50));
    expect(folder).not.toBeNull();
    child.kill('SIGKILL');
    await exited;
    // Its QEMU (named by the folder in its command line) goes with it.
    const qemus = () => readdirSync('/proc').filter((pid) => /^\d+$/.test(pid) && (readFileSafe(`/proc/${pid}/cmdline`) ?? '').includes(folder!));
    for (let i = 0; i < 100 && qemus().length > 0; i++) await new Promise((r) => setTimeout(r, 50));
    expect(qemus()).toEqual([]);
    expect(await folders()).toEqual([folder]);
    const next = await vhdvaultAsync('vm', 'boot-check', repo, 'web', '--timeout', '120');
    expect(next.code, next.stderr).toBe(0);
    expect(await folders()).toEqual([]);
  });

  it('boot-check: a damaged block of one disk fails it, naming that disk', async () => {
    const disks = (JSON.parse((await vhdvaultAsync('list', repo, '--json')).stdout) as { backups: Array<{ disk: string; id: string }> }).backups;
    const vdb = disks.find((d) => d.disk === 'web.vdb')!;
    // The dir layout (init's default): one file per block; block 0 holds the superblock the guest reads first.
    const file = join(repo, 'disks', 'web.vdb', `${vdb.id}.vhd-dir`, 'blocks', '0', '0');
    const fh = await open(file, 'r+');
    const at = 1024 + 100;
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, at);
    await fh.write(Buffer.from([b[0]! ^ 0x20]), 0, 1, at);
    await fh.close();
    const r = await vhdvaultAsync('vm', 'boot-check', repo, 'web', '--timeout', '120');
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/failed its boot check: disk vdb \(web\.vdb\): read error/);
    console.log(`damaged: ${r.stderr.trim()}`);
    expect((await readdir(tmpdir())).filter((n) => n.startsWith('vhdvault-bootcheck-'))).toEqual([]);
  });
});

// libvirt.ts: the libvirtd of the other libvirt tests, held shared by this file (one of them restarts it).
describe.skipIf(libvirtSkip !== undefined)(libvirtTitle('vm restore --define of a libvirt VM backup'), () => {
  const suffix = randomBytes(3).toString('hex');
  const original = `vhdvault-test-lv-${suffix}`;
  const copy = `vhdvault-test-copy-${suffix}`;
  const uuid = randomUUID();
  const mac = '52:54:00:3c:5a:71';
  const virsh = (...args: string[]) => spawnSync('virsh', ['-q', '-c', LIBVIRT, ...args], { encoding: 'utf8' });
  let dir: string;
  let repo: string;

  beforeAll(async () => {
    dir = await tempDir('vhdvault-vmdefine-');
    repo = join(dir, 'repo');
    expect((await vhdvaultAsync('init', repo)).code).toBe(0);
    const ids: Record<string, string> = {};
    for (const target of ['vda', 'vdb']) {
      const raw = join(dir, `${target}.raw`);
      await makeExt4Disk(raw, 16);
      const b = await vhdvaultAsync('backup', repo, `lv.${target}`, '--source', raw);
      expect(b.code, b.stderr).toBe(0);
    }
    for (const d of (JSON.parse((await vhdvaultAsync('list', repo, '--json')).stdout) as { backups: Array<{ disk: string; id: string }> }).backups) ids[d.disk.split('.')[1]!] = d.id;
    const kernelImage = (await readdir('/boot')).filter((n) => /^vmlinuz-.*-cloud-amd64$/.test(n)).sort().map((n) => join('/boot', n)).at(-1)!;
    const xml = `<domain type='qemu'>
  <name>${original}</name>
  <uuid>${uuid}</uuid>
  <memory unit='KiB'>262144</memory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>${kernelImage}</kernel>
    <initrd>${(await guestInitramfs()).path}</initrd>
    <cmdline>console=ttyS0 quiet panic=1 vhdvault.disks=2 vhdvault.writer=0</cmdline>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/${original}-vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/${original}-vdb.qcow2'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <interface type='user'>
      <mac address='${mac}'/>
      <model type='virtio'/>
    </interface>
  </devices>
</domain>
`;
    const r = await Repository.open(repo);
    await writeVmRecord(r, {
      format: 1,
      vm: 'lv',
      id: newBackupId(),
      createdAt: new Date().toISOString(),
      disks: { vda: ids.vda!, vdb: ids.vdb! },
      quiesced: false,
      frozenMs: null,
      pausedMs: null,
      checkpoint: null,
      definition: { kind: 'libvirt', domain: original, uuid, xml },
    });
  });
  afterAll(() => {
    virsh('undefine', copy);
  });

  it("boot-check of a libvirt VM backup: the domain XML's kernel, initrd, command line and memory", async () => {
    const r = await vhdvaultAsync('vm', 'boot-check', repo, 'lv', '--expect', 'VHDVAULT-GUEST-READY mounted=vda,vdb', '--json');
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ vm: 'lv', ok: true, by: 'console' });
  });

  it('defines the restored VM as a new domain: the restored disks, a new UUID, new MACs; an existing name is refused', async () => {
    const out = join(dir, 'restored');
    const r = await vhdvaultAsync('vm', 'restore', repo, 'lv', out, '--define', copy, '--connect', LIBVIRT, '--json');
    expect(r.code, r.stderr).toBe(0);
    const report = JSON.parse(r.stdout) as RestoreReport;
    expect(report).toMatchObject({ vm: 'lv', definition: join(out, 'lv.xml'), defined: copy });
    const dump = virsh('dumpxml', copy);
    expect(dump.status, dump.stderr).toBe(0);
    for (const target of ['vda', 'vdb']) expect(dump.stdout).toMatch(new RegExp(`<driver name='qemu' type='qcow2'/>\\s*<source file='${join(out, `lv.${target}.qcow2`)}'`));
    const newUuid = /<uuid>([^<]+)<\/uuid>/.exec(dump.stdout)?.[1];
    expect(newUuid).toBeDefined();
    expect(newUuid).not.toBe(uuid);
    const macs = [...dump.stdout.matchAll(/<mac address='([^']+)'/g)].map((m) => m[1]);
    expect(macs).toHaveLength(1);
    expect(macs[0]).not.toBe(mac);
    expect(dump.stdout).not.toContain('/var/lib/libvirt/images/');
    expect(virsh('dominfo', original).status).not.toBe(0);
    // The written XML is the one defined.
    const written = await readFile(join(out, 'lv.xml'), 'utf8');
    expect(written).toContain(`<name>${copy}</name>`);
    expect(written).not.toContain(uuid);
    // The name is now taken: refused before anything is written.
    const again = await vhdvaultAsync('vm', 'restore', repo, 'lv', join(dir, 'again'), '--define', copy);
    expect(again.code).toBe(1);
    expect(again.stderr.trim().split('\n')).toHaveLength(1);
    expect(again.stderr).toMatch(/a domain of this name exists/);
    expect(await stat(join(dir, 'again')).catch(() => null)).toBeNull();
  });
});
