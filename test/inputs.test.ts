/**
 * Inputs that are not disk images: a `.vhd` holding no VHD (which must not be
 * taken for a raw image unless asked), an image in another format (whose bytes are
 * a container, not the disk), and FIFOs and sockets (which must be
 * named, not waited on or read at an offset).
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, cliEnv, expectRefused, vhdvault, type CliResult } from './helpers/cli.js';
import { tempDir } from './helpers/files.js';

const dir = await tempDir('vhdvault-inputs-');
const repo = join(dir, 'repo');
const out = join(dir, 'out');

beforeAll(async () => {
  await mkdir(out);
  ok(vhdvault('init', repo));
});

function ok(r: CliResult): CliResult {
  expect(r.code, `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`).toBe(0);
  return r;
}

/** The CLI, killed after 20 s: opening a FIFO for reading waits for a writer, forever. */
function vhdvaultBounded(...args: string[]): CliResult {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 20_000, env: cliEnv() });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

const refused = expectRefused;

/** Nothing was written: no output, no temporary file, no backup. */
async function nothingWritten(): Promise<void> {
  expect(await readdir(out)).toEqual([]);
  expect(ok(vhdvault('list', repo)).stdout).toBe('');
}

describe('a .vhd that holds no VHD', () => {
  it('is refused by convert (suggesting --from raw), info, check and backup --source', async () => {
    const text = join(dir, 'x.vhd');
    await writeFile(text, 'just some text\n'); // 15 bytes
    const line = refused(vhdvault('vhd', 'convert', text, join(out, 'x.raw')), text, /is not a VHD/);
    expect(line).toContain('--from raw');
    refused(vhdvault('vhd', 'info', text), text, /not a VHD|too small to be a VHD/);
    refused(vhdvault('vhd', 'check', text), text, /not a VHD|too small to be a VHD/);
    refused(vhdvault('backup', repo, 'vm', '--source', text), text, /is not a VHD/);
    await nothingWritten();
  });

  it('a larger one too (no cookie at either end), and one spelt .VHD', async () => {
    const big = join(dir, 'big.VHD');
    await writeFile(big, Buffer.alloc(8192, 0x41));
    refused(vhdvault('vhd', 'convert', big, join(out, 'big.raw')), big, /is not a VHD/);
    refused(vhdvault('vhd', 'check', big), big, /not a VHD/);
    refused(vhdvault('backup', repo, 'vm', '--source', big), big, /is not a VHD/);
    await nothingWritten();
  });

  it('--from raw reads it as a raw image', async () => {
    const text = join(dir, 'raw-anyway.vhd');
    await writeFile(text, 'just some text\n');
    ok(vhdvault('vhd', 'convert', text, join(dir, 'raw-anyway.raw'), '--from', 'raw'));
    // 15 bytes padded to a sector, as qemu-img does.
    const converted = await readFile(join(dir, 'raw-anyway.raw'));
    expect(converted.length).toBe(512);
    expect(converted.subarray(0, 15).toString()).toBe('just some text\n');
    // backup takes the same flag: a raw image that happens to be named .vhd can be backed up.
    const own = join(dir, 'from-raw-repo');
    expect(vhdvault('init', own).code).toBe(0);
    const b = vhdvault('backup', own, 'vm', '--source', text, '--from', 'raw', '--json');
    expect(b.code, b.stderr).toBe(0);
    expect(JSON.parse(b.stdout)).toMatchObject({ kind: 'full', size: 512 });
  });

  it('a folder given as a VHD that is not a VHD directory is refused as a backup source', async () => {
    const folder = join(dir, 'folder.vhd');
    await mkdir(folder);
    refused(vhdvault('backup', repo, 'vm', '--source', folder), folder, /not a VHD directory/);
    refused(vhdvault('vhd', 'convert', folder, join(out, 'f.raw')), folder, /not a VHD directory/);
    await nothingWritten();
  });
});

describe('an image in another format (qcow2, vmdk, vdi, vhdx) given as a disk', () => {
  const formats = ['qcow2', 'vmdk', 'vdi', 'vhdx'] as const;
  beforeAll(() => {
    for (const f of formats) {
      const image = join(dir, `image.${f}`);
      execFileSync('qemu-img', ['create', '-q', '-f', f, image, '8M']);
      execFileSync('qemu-io', ['-f', f, '-c', 'write -P 0x5a 1M 3M', image]);
    }
  });

  /** No qemu-nbd of ours is left serving anything under `dir`. */
  const noServerLeft = () => expect(spawnSync('pgrep', ['-f', `qemu-nbd .*${dir}`]).status).toBe(1);

  it('is refused by vhd convert, naming the format and the ways to read it; nothing is written', async () => {
    for (const f of formats) {
      const image = join(dir, `image.${f}`);
      refused(vhdvault('vhd', 'convert', image, join(out, 'x.vhd')), image, new RegExp(`is a ${f} image, not a raw disk or VHD: .*qemu-nbd -r -f ${f} .*--from raw reads the file's own bytes`));
    }
    // Named like a raw image, it is judged by its bytes all the same.
    const disguised = join(dir, 'disguised.img');
    await writeFile(disguised, await readFile(join(dir, 'image.qcow2')));
    refused(vhdvault('vhd', 'convert', disguised, join(out, 'x.vhd')), disguised, /is a qcow2 image/);
    await nothingWritten();
  });

  it('is backed up as the disk inside, through a qemu-nbd that backup starts and stops; --from raw takes the file itself', async () => {
    // A repository of its own: the others here must stay empty.
    const repo = join(dir, 'repo-images');
    ok(vhdvault('init', repo));
    for (const f of formats) {
      const image = join(dir, `image.${f}`);
      const raw = join(dir, `image-${f}.raw`);
      execFileSync('qemu-img', ['convert', '-f', f, '-O', 'raw', image, raw]);
      ok(vhdvault('backup', repo, f, '--source', image));
      ok(vhdvault('restore', repo, f, join(dir, `restored-${f}.raw`)));
      expect((await readFile(join(dir, `restored-${f}.raw`))).equals(await readFile(raw)), f).toBe(true);
      noServerLeft();
    }
    // A delta of the qcow2 stores the one block written since.
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 6M 64k', join(dir, 'image.qcow2')]);
    const delta = JSON.parse(ok(vhdvault('backup', repo, 'qcow2', '--source', join(dir, 'image.qcow2'), '--json')).stdout) as { kind: string; blocksWritten: number };
    expect(delta).toMatchObject({ kind: 'delta', blocksWritten: 1 });
    noServerLeft();
    // An image qemu-nbd cannot open is one line, and no server is left.
    const broken = join(dir, 'broken.qcow2');
    await writeFile(broken, Buffer.concat([(await readFile(join(dir, 'image.qcow2'))).subarray(0, 8), Buffer.alloc(4096, 0xff)]));
    refused(vhdvault('backup', repo, 'broken', '--source', broken), broken, /qemu-nbd cannot open this qcow2 image: /);
    noServerLeft();
    // Killed mid-backup: its qemu-nbd dies with it, and the next backup removes the folder it left.
    const big = join(dir, 'big.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', big, '256M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 128M', big]);
    const killed = spawn(process.execPath, [CLI, 'backup', repo, 'big', '--source', big, '--max-read', '16M'], { stdio: 'ignore', env: cliEnv() });
    for (let i = 0; i < 200 && spawnSync('pgrep', ['-f', `qemu-nbd .*${big}`]).status !== 0; i++) await new Promise((r) => setTimeout(r, 50));
    killed.kill('SIGKILL');
    await new Promise((r) => killed.once('exit', r));
    for (let i = 0; i < 100 && spawnSync('pgrep', ['-f', `qemu-nbd .*${big}`]).status === 0; i++) await new Promise((r) => setTimeout(r, 50));
    noServerLeft();
    ok(vhdvault('backup', repo, 'big2', '--source', join(dir, 'image.vdi')));
    expect((await readdir(process.env.TMPDIR ?? '/tmp')).filter((n) => n.startsWith(`vhdvault-image-${killed.pid}-`))).toEqual([]);
    // The file's own bytes, when that is what is wanted: as large as the container, not the disk.
    const image = join(dir, 'image.qcow2');
    ok(vhdvault('backup', repo, 'container', '--source', image, '--from', 'raw'));
    ok(vhdvault('restore', repo, 'container', join(dir, 'container.raw')));
    const container = await readFile(image);
    expect((await readFile(join(dir, 'container.raw'))).subarray(0, container.length).equals(container)).toBe(true);
  });
});

describe('FIFOs and sockets', () => {
  let fifo: string;
  let socket: string;
  let server: Server;
  beforeAll(async () => {
    fifo = join(dir, 'pipe.vhd');
    execFileSync('mkfifo', [fifo]);
    socket = join(dir, 'sock.raw');
    server = createServer();
    await new Promise<void>((resolve) => server.listen(socket, resolve));
  });
  afterAll(() => new Promise<void>((resolve) => server.close(() => resolve())));

  it('a FIFO is named, not waited on (no writer ever comes)', async () => {
    refused(vhdvaultBounded('vhd', 'convert', fifo, join(out, 'p.raw')), fifo, /is a FIFO, not a disk image/);
    refused(vhdvaultBounded('vhd', 'convert', fifo, join(out, 'p.raw'), '--from', 'raw'), fifo, /is a FIFO, not a disk image/);
    refused(vhdvaultBounded('vhd', 'info', fifo), fifo, /is a FIFO, not a disk image/);
    refused(vhdvaultBounded('vhd', 'check', fifo), fifo, /is a FIFO, not a disk image/);
    refused(vhdvaultBounded('backup', repo, 'vm', '--source', fifo), fifo, /is a FIFO, not a disk image/);
    await nothingWritten();
  });

  it('a socket is named', async () => {
    refused(vhdvault('vhd', 'convert', socket, join(out, 's.raw')), socket, /is a socket, not a disk image/);
    refused(vhdvault('vhd', 'info', socket), socket, /is a socket, not a disk image/);
    refused(vhdvault('backup', repo, 'vm', '--source', socket), socket, /is a socket, not a disk image/);
    await nothingWritten();
  });

  it('a character device is named as an input', async () => {
    refused(vhdvault('vhd', 'convert', '/dev/zero', join(out, 'z.raw')), '/dev/zero', /is a character device, not a disk image/);
    await nothingWritten();
  });
});

describe('vhd create --parent with --size', () => {
  it('accepts the parent\'s size and refuses another (usage error)', async () => {
    const sub = join(dir, 'create');
    await mkdir(sub);
    const base = join(sub, 'base.vhd');
    ok(vhdvault('vhd', 'create', base, '--size', '6M'));
    ok(vhdvault('vhd', 'create', join(sub, 'same.vhd'), '--parent', base, '--size', '6M'));
    ok(vhdvault('vhd', 'create', join(sub, 'same-bytes.vhd-dir'), '--parent', base, '--size', String(6 * 1024 * 1024)));
    const info = JSON.parse(ok(vhdvault('vhd', 'info', join(sub, 'same.vhd'), '--json')).stdout) as { type: string; size: number };
    expect(info).toMatchObject({ type: 'differencing', size: 6 * 1024 * 1024 });
    const r = vhdvault('vhd', 'create', join(sub, 'other.vhd'), '--parent', base, '--size', '8M');
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(/--size .*parent's size/);
    expect((await readdir(sub)).sort()).toEqual(['base.vhd', 'same-bytes.vhd-dir', 'same.vhd']);
  });
});
