/**
 * The corpus of corrupt and hostile inputs.
 *
 * Valid disks are built through the public API, copied, and damaged byte by
 * byte (checksums are recomputed wherever the damage should be caught by a
 * check other than the checksum one). Every bad input is then fed to the built
 * CLI, which must:
 *   - exit 1 (usage errors exit 2, see the end of the file);
 *   - print exactly one non-empty line on stderr, naming the bad file and the
 *     problem, with no stack trace, and nothing on stdout;
 *   - leave its input byte for byte unchanged (and create nothing beside it);
 *   - for `convert`, leave neither the output nor any temporary file behind.
 * Positive controls show that the undamaged disks pass, so nothing here can
 * pass vacuously.
 */
import { mkdir, open, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { execFileSync } from 'node:child_process';
import { dirname, join, relative } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { vhdvault, vhdvaultAsync, type CliResult } from './helpers/cli.js';
import { sameBytes, sha256, tempDir } from './helpers/files.js';
import { hasQemuImg, qemuInfo } from './helpers/qemu.js';
import {
  corruptCopy,
  editFooters,
  editHeader,
  F,
  FOOTER_SIZE,
  garbage,
  getBatEntry,
  H,
  header,
  HEADER_OFFSET,
  locator,
  setBatEntry,
  tableOffset,
} from './helpers/corrupt.js';
import { createDifferencingVhd, createDynamicVhd } from '../src/vhd/create.js';
import { DynamicVhdWriter } from '../src/vhd/VhdWriter.js';
import { VhdFile } from '../src/vhd/VhdFile.js';
import { newFooter, serializeFooter } from '../src/vhd/footer.js';
import { newHeader, serializeHeader } from '../src/vhd/header.js';
import { newUuid } from '../src/vhd/uuid.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** The reference disk: 4 MiB in four 1 MiB blocks, blocks 0, 1 and 3 allocated. */
const SIZE = 4 * MiB;
const BLOCK = 1 * MiB;
const BITMAP = 512; // 2048 sectors → 256 bytes, padded to a sector
const STORED = BITMAP + BLOCK;
const ALLOCATED = [0, 1, 3] as const;

const blockData = (block: number) => garbage(BLOCK, `block-${block}`);

// At the top level, not in a hook: tempDir registers the afterAll that removes the directory.
const root = await tempDir('vhdvault-badinput-');
/** The reference dynamic disk; never modified (cases work on copies). */
const good = join(root, 'good.vhd');
let goodBytes: Buffer;

beforeAll(async () => {
  const writer = await DynamicVhdWriter.create(good, { size: SIZE, blockSize: BLOCK });
  for (const b of ALLOCATED) await writer.writeBlock(b, blockData(b));
  await writer.finish();
  goodBytes = await readFile(good);
});

// ---------------------------------------------------------------------------
// Assertions

type Command = 'check' | 'info' | 'convert';

function oneLine(r: CliResult): string {
  expect(r.stderr, 'stderr must end with a newline').toMatch(/\n$/);
  const line = r.stderr.slice(0, -1);
  expect(line, `stderr must be exactly one line, got:\n${r.stderr}`).not.toContain('\n');
  expect(line.trim()).not.toBe('');
  return line;
}

/** Exit 1, nothing on stdout, one line on stderr naming `names` and matching `problem`, no stack. */
function expectRejected(r: CliResult, names: string[], problem: RegExp): void {
  const context = `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
  expect(r.stderr, context).not.toContain('    at ');
  expect(r.stderr, context).not.toMatch(/Native stack trace|Assertion failed/);
  expect(r.code, context).toBe(1);
  expect(r.stdout, context).toBe('');
  const line = oneLine(r);
  for (const name of names) expect(line, context).toContain(name);
  expect(line, context).toMatch(problem);
}

/** Files from this size on are snapshotted as a sparse copy, not a hash: hashing a 2 GiB sparse image reads 2 GiB of holes. */
const BIG_FILE = 256 * MiB;
const UNCHANGED = 'the same bytes as the copy taken before';

/**
 * Every regular file under `dir` (recursively) → its SHA-256; a large file
 * instead → UNCHANGED when it holds the same bytes as its copy under `aside`.
 * The first snapshot (`first` true) makes those copies (`cp` keeps the holes).
 */
async function snapshot(dir: string, aside: string, first: boolean): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const entry of await readdir(dir, { recursive: true, withFileTypes: true })) {
    if (!entry.isFile()) continue;
    const p = join(entry.parentPath, entry.name);
    const rel = relative(dir, p);
    if ((await stat(p)).size < BIG_FILE) {
      out[rel] = await sha256(p);
    } else if (first) {
      const copy = join(aside, rel);
      await mkdir(dirname(copy), { recursive: true });
      execFileSync('cp', ['--sparse=always', p, copy]);
      out[rel] = UNCHANGED;
    } else {
      const copy = join(aside, rel);
      out[rel] = (await stat(copy).catch(() => null)) && (await sameBytes(p, copy)) ? UNCHANGED : 'changed';
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// The cases

interface BadInput {
  name: string;
  /** Build the bad input inside the empty directory `dir`; resolves to the path handed to the CLI. */
  make: (dir: string) => Promise<string>;
  /** What the one stderr line must say (per command when they legitimately differ). */
  problem: RegExp;
  override?: Partial<Record<Command, RegExp>>;
  /** Paths the line must contain (default: the input). */
  names?: (dir: string, input: string) => string[];
  commands: Command[];
}

const ALL: Command[] = ['check', 'info', 'convert'];
/** Parent problems: `info` describes one file and does not open parents, by design. */
const CHAIN: Command[] = ['check', 'convert'];
/**
 * Inputs with no VHD cookie at either end: `convert` refuses them when named
 * .vhd (inputs.test.ts) and takes them for raw images otherwise, by design
 * (`vhd convert` accepts raw input), so only check and info apply here.
 */
const NOT_VHD: Command[] = ['check', 'info'];

/** A damaged copy of the reference disk. */
function fromGood(edit: (image: Buffer) => void | Buffer): (dir: string) => Promise<string> {
  return async (dir) => {
    const p = join(dir, 'disk.vhd');
    await corruptCopy(good, p, edit);
    return p;
  };
}

const offsetOf = (image: Buffer, block: number) => getBatEntry(image, block) * 512;

const structural: BadInput[] = [
  // -- not a VHD at all
  {
    name: 'garbage file (64 KiB of random bytes)',
    make: async (dir) => {
      const p = join(dir, 'garbage.vhd');
      await writeFile(p, garbage(64 * KiB, 'garbage'));
      return p;
    },
    problem: /bad cookie .*not a VHD/,
    commands: NOT_VHD,
  },
  {
    name: 'empty file',
    make: async (dir) => {
      const p = join(dir, 'empty.vhd');
      await writeFile(p, Buffer.alloc(0));
      return p;
    },
    problem: /too small to be a VHD \(0 bytes\)/,
    // Named .vhd, so convert does not take it for an (empty) raw image.
    override: { convert: /is not a VHD: no VHD footer.*--from raw/ },
    commands: ALL,
  },
  {
    name: 'file shorter than 512 bytes (random)',
    make: async (dir) => {
      const p = join(dir, 'short.vhd');
      await writeFile(p, garbage(300, 'short'));
      return p;
    },
    problem: /too small to be a VHD \(300 bytes\)/,
    commands: NOT_VHD,
  },
  {
    name: 'file shorter than 512 bytes (the first 300 bytes of a VHD, cookie included)',
    make: fromGood((image) => image.subarray(0, 300)),
    problem: /too small to be a VHD \(300 bytes\)/,
    commands: ALL,
  },

  // -- truncation
  {
    name: 'truncated in the middle of a block, not on a sector boundary',
    make: fromGood((image) => image.subarray(0, offsetOf(image, 1) + BITMAP + 1000)),
    problem: /not a multiple of 512 bytes \(truncated\?\)/,
    commands: ALL,
  },
  {
    name: 'truncated in the middle of a block, on a sector boundary',
    make: fromGood((image) => image.subarray(0, offsetOf(image, 1) + BITMAP + 256 * KiB)),
    problem: /truncated or damaged: no valid footer at the end/,
    commands: ALL,
  },
  {
    name: 'trailing footer cut off',
    make: fromGood((image) => image.subarray(0, image.length - FOOTER_SIZE)),
    problem: /truncated or damaged: no valid footer at the end/,
    commands: ALL,
  },
  {
    name: 'cut right after the block allocation table',
    make: fromGood((image) => image.subarray(0, tableOffset(image) + 512)),
    problem: /truncated or damaged: no valid footer at the end/,
    commands: ALL,
  },
  {
    name: 'cut down to the footer copy alone (512 bytes)',
    make: fromGood((image) => image.subarray(0, FOOTER_SIZE)),
    problem: /truncated|past the end/,
    commands: ALL,
  },

  // -- footer
  {
    name: 'size not a whole number of sectors (checksums valid)',
    make: fromGood((image) => editFooters(image, (f) => f.writeBigUInt64BE(BigInt(SIZE - 412), F.currentSize))),
    problem: /declares size 4193892 bytes, not a whole number of 512-byte sectors/,
    commands: ALL,
  },
  {
    name: 'bad footer cookie (both copies, checksums valid)',
    make: fromGood((image) => editFooters(image, (f) => f.write('conectiX', F.cookie, 'latin1'))),
    problem: /footer at end of file has bad cookie "conectiX"/,
    commands: NOT_VHD,
  },
  {
    name: 'bad footer cookie in the copy at offset 0 only',
    make: fromGood((image) => editFooters(image, (f) => f.write('XXXXXXXX', F.cookie, 'latin1'), 'head')),
    problem: /footer copy at offset 0 has bad cookie "XXXXXXXX"/,
    commands: ALL,
  },
  {
    name: 'bad footer cookie in the trailing footer only',
    make: fromGood((image) => editFooters(image, (f) => f.write('XXXXXXXX', F.cookie, 'latin1'), 'tail')),
    problem: /truncated or damaged: no valid footer at the end/,
    commands: ALL,
  },
  {
    name: 'bad footer checksum (both copies)',
    make: fromGood((image) => editFooters(image, (f) => f.writeUInt8(f.readUInt8(100) ^ 0x01, 100), 'both', false)),
    problem: /footer at end of file has bad checksum/,
    commands: ALL,
  },
  {
    name: 'bad footer checksum in the copy at offset 0 only',
    make: fromGood((image) => editFooters(image, (f) => f.writeUInt32BE((f.readUInt32BE(F.checksum) ^ 0x10) >>> 0, F.checksum), 'head', false)),
    problem: /footer copy at offset 0 has bad checksum/,
    commands: ALL,
  },
  {
    name: 'unsupported disk type 5 (checksums valid)',
    make: fromGood((image) => editFooters(image, (f) => f.writeUInt32BE(5, F.diskType))),
    problem: /unsupported disk type 5/,
    commands: ALL,
  },
  {
    name: 'unsupported footer format version 2.0 (checksums valid)',
    make: fromGood((image) => editFooters(image, (f) => f.writeUInt32BE(0x00020000, F.formatVersion))),
    problem: /unsupported format version 0x00020000/,
    commands: ALL,
  },
  {
    name: 'footer copy at offset 0 differs from the trailing footer (both valid)',
    make: fromGood((image) => editFooters(image, (f) => f.writeUInt32BE(f.readUInt32BE(F.timestamp) + 1, F.timestamp), 'head')),
    problem: /footer copy at offset 0 differs from the footer at the end/,
    commands: ALL,
  },
  {
    name: 'footer declares a size above 2040 GiB (checksums valid)',
    make: fromGood((image) => editFooters(image, (f) => f.writeBigUInt64BE(BigInt(2041 * GiB), F.currentSize))),
    problem: new RegExp(`declares size ${2041 * GiB} bytes, above the 2040 GiB maximum`),
    commands: ALL,
  },
  {
    name: 'footer points the dynamic header past the end of the file',
    make: fromGood((image) => editFooters(image, (f) => f.writeBigUInt64BE(BigInt(GiB), F.dataOffset))),
    problem: /dynamic header offset 1073741824 is past the end/,
    commands: ALL,
  },

  // -- dynamic header
  {
    name: 'bad dynamic header cookie (checksum valid)',
    make: fromGood((image) => editHeader(image, (h) => h.write('cxsparsE', H.cookie, 'latin1'))),
    problem: /dynamic header has bad cookie "cxsparsE"/,
    commands: ALL,
  },
  {
    name: 'bad dynamic header checksum',
    make: fromGood((image) => editHeader(image, (h) => h.writeUInt8(h.readUInt8(1000) ^ 0x80, 1000), false)),
    problem: /dynamic header has bad checksum/,
    commands: ALL,
  },
  {
    name: 'unsupported dynamic header version 2.0 (checksum valid)',
    make: fromGood((image) => editHeader(image, (h) => h.writeUInt32BE(0x00020000, H.headerVersion))),
    problem: /dynamic header has unsupported version 0x20000/,
    commands: ALL,
  },
  {
    name: 'block size not a power of two: 3 MiB (checksum valid)',
    make: fromGood((image) => editHeader(image, (h) => h.writeUInt32BE(3 * MiB, H.blockSize))),
    problem: /block size 3145728 is not a power of two/,
    commands: ALL,
  },
  {
    name: 'block size not a power of two: 0 (checksum valid)',
    make: fromGood((image) => editHeader(image, (h) => h.writeUInt32BE(0, H.blockSize))),
    problem: /block size 0 is not a power of two/,
    commands: ALL,
  },
  {
    name: 'table too small for the size: 2 entries for 4 blocks (checksum valid)',
    make: fromGood((image) => editHeader(image, (h) => h.writeUInt32BE(2, H.maxTableEntries))),
    problem: /block allocation table too small: 2 entries/,
    commands: ALL,
  },
  {
    name: 'table implausibly large: 0xFFFFFFFF entries (checksum valid)',
    make: fromGood((image) => editHeader(image, (h) => h.writeUInt32BE(0xffffffff, H.maxTableEntries))),
    problem: /block allocation table of 4294967295 entries is implausibly large/,
    commands: ALL,
  },
  {
    name: 'block allocation table offset past the end of the file (checksum valid)',
    make: fromGood((image) => editHeader(image, (h) => h.writeBigUInt64BE(BigInt(GiB), H.tableOffset))),
    problem: /block allocation table \(4 entries at offset 1073741824\) extends past the end/,
    commands: ALL,
  },
  {
    // The table is moved into the header's own parent-name field (unused by a
    // dynamic disk, so the entries can be valid there): allocating a block
    // would then overwrite the header. Nothing else is wrong with the file.
    name: 'block allocation table placed inside the dynamic header (checksum valid)',
    make: fromGood((image) => {
      const entries = Buffer.from(image.subarray(tableOffset(image), tableOffset(image) + 16));
      editHeader(image, (h) => {
        h.writeBigUInt64BE(BigInt(HEADER_OFFSET + 512), H.tableOffset); // file offset 1024, header byte 512
        entries.copy(h, 512); // inside the parent name field (header bytes 64..576)
      });
    }),
    problem: /^(?=.*overlap)(?=.*header)/, // e.g. "block allocation table at offset 1024 overlaps the dynamic header"
    commands: ALL,
  },

  // -- block allocation table entries
  {
    name: 'BAT entry far past the end of the file',
    make: fromGood((image) => setBatEntry(image, 1, 0x00100000)),
    problem: /BAT entry for block 1 points to offset 536870912, past the end/,
    commands: ALL,
  },
  {
    name: 'BAT entry one sector too far: the last block runs into the trailing footer',
    make: fromGood((image) => setBatEntry(image, 3, getBatEntry(image, 3) + 1)),
    problem: /BAT entry for block 3 points to offset \d+, past the end/,
    commands: ALL,
  },
  {
    name: 'BAT entry 0xFFFFFFFE (largest non-sentinel value)',
    make: fromGood((image) => setBatEntry(image, 2, 0xfffffffe)),
    problem: /BAT entry for block 2 points to offset \d+, past the end/,
    commands: ALL,
  },
  {
    name: 'BAT entry pointing at the footer copy (sector 0)',
    make: fromGood((image) => setBatEntry(image, 0, 0)),
    problem: /^(?=.*overlap)(?=.*footer copy)(?=.*block 0\b)/,
    commands: ALL,
  },
  {
    name: 'BAT entry pointing into the dynamic header',
    make: fromGood((image) => setBatEntry(image, 2, 1)),
    problem: /^(?=.*overlap)(?=.*dynamic header)(?=.*block 2\b)/,
    commands: ALL,
  },
  {
    name: 'BAT entry pointing into the block allocation table',
    make: fromGood((image) => setBatEntry(image, 2, tableOffset(image) / 512)),
    problem: /^(?=.*overlap)(?=.*block allocation table)(?=.*block 2\b)/,
    commands: ALL,
  },
  {
    name: 'two BAT entries overlapping partly',
    make: fromGood((image) => setBatEntry(image, 3, getBatEntry(image, 1) + 8)),
    problem: /^(?=.*overlap)(?=.*block 1\b)(?=.*block 3\b)/,
    commands: ALL,
  },
  {
    name: 'two BAT entries pointing at the same block',
    make: fromGood((image) => setBatEntry(image, 2, getBatEntry(image, 0))),
    problem: /^(?=.*overlap)(?=.*block 0\b)(?=.*block 2\b)/,
    commands: ALL,
  },
];

// -- differencing disks and chains

/** A dynamic base with one block, and a differencing child over it with one partial block. */
async function makeChain(dir: string): Promise<{ base: string; child: string; baseUuid: string }> {
  const base = join(dir, 'base.vhd');
  const child = join(dir, 'child.vhd');
  await createDynamicVhd(base, { size: SIZE, blockSize: BLOCK });
  const b = await VhdFile.open(base, { writable: true });
  try {
    await b.writeBlock(2, blockData(20));
  } finally {
    await b.close();
  }
  await createDifferencingVhd(child, base);
  const c = await VhdFile.open(child, { writable: true });
  try {
    const bitmap = Buffer.alloc(c.bitmapSize);
    bitmap.fill(0xff, 0, 64); // the first half of the block's sectors
    await c.writeBlock(2, blockData(21), bitmap);
  } finally {
    await c.close();
  }
  const opened = await VhdFile.open(base);
  const baseUuid = opened.footer.uuid;
  await opened.close();
  return { base, child, baseUuid };
}

/** A differencing disk at `path` with the given identity and parent record (hand-made links). */
async function makeLinked(path: string, uuid: string, parentUuid: string, parentPath: string, parentRelative: string): Promise<void> {
  const w = await DynamicVhdWriter.create(path, {
    size: SIZE,
    blockSize: BLOCK,
    uuid,
    parent: { uuid: parentUuid, timestamp: 0, relativePath: parentRelative, absolutePath: parentPath },
  });
  await w.finish();
}

const chains: BadInput[] = [
  {
    name: 'differencing disk whose parent is missing',
    make: async (dir) => {
      const { base, child } = await makeChain(dir);
      await rm(base);
      return child;
    },
    problem: /parent disk not found \(tried .*base\.vhd/,
    commands: CHAIN,
  },
  {
    name: 'differencing disk whose parent exists but has another UUID',
    make: async (dir) => {
      const { base, child } = await makeChain(dir);
      await rm(base);
      await createDynamicVhd(base, { size: SIZE, blockSize: BLOCK });
      return child;
    },
    problem: /has UUID [0-9a-f-]{36}, this disk expects [0-9a-f-]{36}/,
    names: (dir, input) => [input, join(dir, 'base.vhd')],
    commands: CHAIN,
  },
  {
    name: 'differencing disk whose parent has the right UUID but another block size',
    make: async (dir) => {
      const { base, child, baseUuid } = await makeChain(dir);
      await rm(base);
      await (await DynamicVhdWriter.create(base, { size: SIZE, blockSize: 2 * MiB, uuid: baseUuid })).finish();
      return child;
    },
    problem: /block size 1048576 differs from parent/,
    commands: CHAIN,
  },
  {
    name: 'differencing disk larger than its parent (right UUID)',
    make: async (dir) => {
      const { base, child, baseUuid } = await makeChain(dir);
      await rm(base);
      await (await DynamicVhdWriter.create(base, { size: SIZE / 2, blockSize: BLOCK, uuid: baseUuid })).finish();
      return child;
    },
    problem: /larger than its parent/,
    commands: CHAIN,
  },
  {
    name: 'differencing disk that records no parent name or locator',
    make: async (dir) => {
      const p = join(dir, 'orphan.vhd');
      await makeLinked(p, newUuid(), newUuid(), '', '');
      return p;
    },
    problem: /parent disk not found \(it records no parent name or locator\)/,
    commands: CHAIN,
  },
  {
    name: 'differencing disk that is its own parent',
    make: async (dir) => {
      const p = join(dir, 'self.vhd');
      const uuid = newUuid();
      await makeLinked(p, uuid, uuid, p, 'self.vhd');
      return p;
    },
    problem: /parent chain loops/,
    commands: CHAIN,
  },
  {
    name: 'parent chain loop of two disks (A → B → A, UUIDs matching)',
    make: async (dir) => {
      const a = join(dir, 'a.vhd');
      const b = join(dir, 'b.vhd');
      const [ua, ub] = [newUuid(), newUuid()];
      await makeLinked(a, ua, ub, b, 'b.vhd');
      await makeLinked(b, ub, ua, a, 'a.vhd');
      return a;
    },
    problem: /parent chain loops/,
    commands: CHAIN,
  },
  {
    name: 'parent chain loop of three disks (A → B → C → A, UUIDs matching)',
    make: async (dir) => {
      const [a, b, c] = ['a.vhd', 'b.vhd', 'c.vhd'].map((n) => join(dir, n)) as [string, string, string];
      const [ua, ub, uc] = [newUuid(), newUuid(), newUuid()];
      await makeLinked(a, ua, ub, b, 'b.vhd');
      await makeLinked(b, ub, uc, c, 'c.vhd');
      await makeLinked(c, uc, ua, a, 'a.vhd');
      return a;
    },
    problem: /parent chain loops/,
    commands: CHAIN,
  },
  {
    // The child is what is wrong (it names a directory as its parent): the
    // message must name the child, as for any other unusable parent record.
    name: 'differencing disk whose parent locators and name point at a directory',
    make: async (dir) => {
      const p = join(dir, 'child.vhd');
      await mkdir(join(dir, 'parentdir'));
      await makeLinked(p, newUuid(), newUuid(), join(dir, 'parentdir'), 'parentdir');
      return p;
    },
    problem: /parentdir: is not a VHD directory .*\(parent of .*child\.vhd\)/,
    commands: CHAIN,
  },
  {
    name: 'sound differencing disk over a corrupt parent (bad header checksum)',
    make: async (dir) => {
      const { base, child } = await makeChain(dir);
      await corruptCopy(base, base, (image) => editHeader(image, (h) => h.writeUInt8(h.readUInt8(900) ^ 0x01, 900), false));
      return child;
    },
    problem: /dynamic header has bad checksum/,
    names: (dir) => [join(dir, 'base.vhd')],
    commands: CHAIN,
  },
  {
    // The parent locator data is metadata just like the header and the BAT:
    // a block stored over it would overwrite the parent's path when written.
    name: 'differencing disk with a block stored over its parent locator data',
    make: async (dir) => {
      const { child } = await makeChain(dir);
      await corruptCopy(child, child, (image) => {
        const w2ru = locator(image, 0);
        expect(w2ru.platform).toBe('W2ru');
        expect(offsetOf(image, 2)).toBeGreaterThan(w2ru.offset);
        setBatEntry(image, 2, w2ru.offset / 512);
      });
      return child;
    },
    problem: /^(?=.*overlap)(?=.*locator)/, // e.g. "block 2 at offset 2048 overlaps parent locator 0"
    commands: ALL,
  },
];

/**
 * A hostile header with a 2 GiB block size (a power of two, so it passes the
 * power-of-two check) and one allocated block, in a sparse file of 2 GiB. The
 * format's largest block size is 256 MiB (Hyper-V; MAX_BLOCK_SIZE here): a
 * reader must refuse such a disk plainly, not try to read a 2 GiB block.
 */
const hugeBlock: Omit<BadInput, 'commands'> = {
  name: 'block size of 2 GiB (a power of two, above the 256 MiB maximum) with one allocated block',
  make: async (dir) => {
    const p = join(dir, 'hugeblock.vhd');
    const blockSize = 2 * GiB;
    const bitmapSize = 512 * KiB; // 4 Mi sectors, one bit each
    const footer = serializeFooter(newFooter('dynamic', SIZE));
    const bat = Buffer.alloc(512, 0xff);
    bat.writeUInt32BE(2048 / 512, 0);
    const fh = await open(p, 'wx');
    try {
      await fh.write(footer, 0, FOOTER_SIZE, 0);
      await fh.write(serializeHeader(newHeader(1, blockSize)), 0, undefined, HEADER_OFFSET);
      await fh.write(bat, 0, 512, 1536);
      await fh.write(Buffer.alloc(bitmapSize, 0xff), 0, bitmapSize, 2048);
      await fh.write(Buffer.from('data'), 0, 4, 2048 + bitmapSize);
      await fh.write(footer, 0, FOOTER_SIZE, 2048 + bitmapSize + blockSize);
    } finally {
      await fh.close();
    }
    return p;
  },
  problem: /block size/,
};

async function runCase(c: BadInput, caseDir: string): Promise<void> {
  await mkdir(caseDir, { recursive: true });
  const input = await c.make(caseDir);
  const names = c.names ? c.names(caseDir, input) : [input];
  const aside = `${caseDir}-before`;
  const before = await snapshot(caseDir, aside, true);
  expect(before[relative(caseDir, input)], 'the case built no input file').toBeDefined();
  // The commands only read the input (convert writes into its own folder): they run side by side.
  const outDir = `${caseDir}-out`;
  if (c.commands.includes('convert')) await mkdir(outDir);
  const out = join(outDir, 'disk.raw');
  const results = await Promise.all(
    c.commands.map((command) => (command === 'convert' ? vhdvaultAsync('vhd', 'convert', input, out) : vhdvaultAsync('vhd', command, input))),
  );
  for (const [i, command] of c.commands.entries()) {
    const problem = c.override?.[command] ?? c.problem;
    expectRejected(results[i]!, names, problem);
    if (command === 'convert') {
      await expect(stat(out)).rejects.toMatchObject({ code: 'ENOENT' });
      expect(await readdir(outDir), 'convert left files in the output directory').toEqual([]);
    }
  }
  expect(await snapshot(caseDir, aside, false), 'input files changed (or files appeared beside them)').toEqual(before);
}

const slug = (name: string) => name.replace(/[^a-z0-9]+/gi, '-').replace(/^-|-$/g, '').slice(0, 60);

describe.concurrent('positive controls', () => {
  it('the reference disk passes check, info and convert', async () => {
    const r = await vhdvaultAsync('vhd', 'check', good);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    expect(r.stdout).toContain(`${good}: ok (dynamic, ${SIZE} bytes)`);

    const info = await vhdvaultAsync('vhd', 'info', '--json', good);
    expect(info.code, info.stderr).toBe(0);
    expect(JSON.parse(info.stdout)).toMatchObject({ type: 'dynamic', size: SIZE, blockSize: BLOCK, allocatedBlocks: ALLOCATED.length });

    const outDir = join(root, 'control-out');
    await mkdir(outDir);
    const out = join(outDir, 'good.raw');
    const conv = await vhdvaultAsync('vhd', 'convert', good, out);
    expect(conv.code, conv.stderr).toBe(0);
    const raw = await readFile(out);
    expect(raw.length).toBe(SIZE);
    for (let b = 0; b < SIZE / BLOCK; b++) {
      const expected = (ALLOCATED as readonly number[]).includes(b) ? blockData(b) : Buffer.alloc(BLOCK);
      expect(raw.subarray(b * BLOCK, (b + 1) * BLOCK).equals(expected), `block ${b}`).toBe(true);
    }
    expect(await readdir(outDir)).toEqual(['good.raw']);
    expect((await readFile(good)).equals(goodBytes)).toBe(true);
    if (hasQemuImg) expect(qemuInfo(good)['virtual-size']).toBe(SIZE);
  });

  it('the corruption helpers change nothing when the edit changes nothing', async () => {
    const dir = join(root, 'identity');
    await mkdir(dir);
    const p = await fromGood((image) => {
      editFooters(image, () => undefined);
      editHeader(image, () => undefined);
      setBatEntry(image, 1, getBatEntry(image, 1));
      expect(header(image).toString('latin1', 0, 8)).toBe('cxsparse');
      expect(ALLOCATED.map((b) => offsetOf(image, b))).toEqual([2048, 2048 + STORED, 2048 + 2 * STORED]);
    })(dir);
    expect((await readFile(p)).equals(goodBytes)).toBe(true);
    expect((await vhdvaultAsync('vhd', 'check', p)).code).toBe(0);
  });

  it('a sound differencing chain passes check and convert', async () => {
    const dir = join(root, 'control-chain');
    await mkdir(dir);
    const { child } = await makeChain(dir);
    const r = await vhdvaultAsync('vhd', 'check', child);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('chain of 2 disks');
    const conv = await vhdvaultAsync('vhd', 'convert', child, join(dir, 'out.raw'));
    expect(conv.code, conv.stderr).toBe(0);
  });

  it('hand-linked differencing disks pass when the links are sound (so the loop cases test the loop)', async () => {
    const dir = join(root, 'control-linked');
    await mkdir(dir);
    const a = join(dir, 'a.vhd');
    const b = join(dir, 'b.vhd');
    const [ua, ub] = [newUuid(), newUuid()];
    await makeLinked(a, ua, ub, b, 'b.vhd');
    await (await DynamicVhdWriter.create(b, { size: SIZE, blockSize: BLOCK, uuid: ub })).finish();
    const r = await vhdvaultAsync('vhd', 'check', a);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('chain of 2 disks');
  });
});

describe.concurrent('bad input: one damaged file', () => {
  for (const c of structural) it(c.name, () => runCase(c, join(root, 'cases', slug(c.name))));
});

describe.concurrent('bad input: parents and chains', () => {
  for (const c of chains) it(c.name, () => runCase(c, join(root, 'chains', slug(c.name))));
});

describe.concurrent('bad input: hostile sizes', () => {
  it(`${hugeBlock.name}: check`, () => runCase({ ...hugeBlock, commands: ['check'] }, join(root, 'hostile', 'huge-block-check')));
  it(`${hugeBlock.name}: convert`, () => runCase({ ...hugeBlock, commands: ['convert'] }, join(root, 'hostile', 'huge-block-convert')));
});

describe.concurrent('bad input: paths that are not files', () => {
  it('a path that does not exist', async () => {
    const dir = join(root, 'missing');
    await mkdir(dir);
    const p = join(dir, 'nope.vhd');
    for (const command of ['check', 'info'] as const) expectRejected(await vhdvaultAsync('vhd', command, p), [p], /no such file or directory/);
    const outDir = join(root, 'missing-out');
    await mkdir(outDir);
    expectRejected(await vhdvaultAsync('vhd', 'convert', p, join(outDir, 'x.raw')), [p], /no such file or directory/);
    expect(await readdir(outDir)).toEqual([]);
    expect(await readdir(dir)).toEqual([]);
  });

  it('a directory', async () => {
    const dir = join(root, 'dirinput');
    const p = join(dir, 'adir.vhd');
    await mkdir(p, { recursive: true });
    // A directory may be an exploded VHD; an empty one is not.
    for (const command of ['check', 'info'] as const) expectRejected(await vhdvaultAsync('vhd', command, p), [p], /not a VHD directory/);
    const outDir = join(root, 'dirinput-out');
    await mkdir(outDir);
    expectRejected(await vhdvaultAsync('vhd', 'convert', p, join(outDir, 'x.raw')), [p], /not a VHD directory/);
    expect(await readdir(outDir)).toEqual([]);
    expect(await readdir(p)).toEqual([]);
  });
});

describe.concurrent('outputs never destroy inputs', () => {
  it('vhd create refuses an existing file, even its own --parent', async () => {
    const dir = join(root, 'exists');
    await mkdir(dir);
    const base = join(dir, 'base.vhd');
    expect((await vhdvaultAsync('vhd', 'create', base, '--size', '4M')).code).toBe(0);
    const before = await sha256(base);
    expectRejected(await vhdvaultAsync('vhd', 'create', base, '--size', '8M'), [base], /already exists/);
    expectRejected(await vhdvaultAsync('vhd', 'create', base, '--parent', base), [base], /already exists/);
    expect(await sha256(base)).toBe(before);
    expect((await readdir(dir)).sort()).toEqual(['base.vhd']);
  });

  it('vhd convert refuses to write over a parent of its input', async () => {
    const dir = join(root, 'over-parent');
    await mkdir(dir);
    const base = join(dir, 'base.vhd');
    const child = join(dir, 'child.vhd-dir');
    expect((await vhdvaultAsync('vhd', 'create', base, '--size', '4M')).code).toBe(0);
    expect((await vhdvaultAsync('vhd', 'create', child, '--parent', base)).code).toBe(0);
    const before = await sha256(base);
    // Refused like any output that would destroy an input (outputs.test.ts): exit 1, one line.
    expectRejected(await vhdvaultAsync('vhd', 'convert', child, base), [base], /a parent of the input/);
    expect(await sha256(base)).toBe(before);
    expect((await vhdvaultAsync('vhd', 'check', child)).code).toBe(0);
  });

  it('an output in a missing folder or on a directory is named as the user gave it', async () => {
    const dir = join(root, 'bad-out');
    await mkdir(join(dir, 'adir.raw'), { recursive: true });
    const missing = join(dir, 'nope', 'x.raw');
    expectRejected(await vhdvaultAsync('vhd', 'convert', good, missing), [missing], /its folder does not exist/);
    expectRejected(await vhdvaultAsync('vhd', 'convert', good, join(dir, 'adir.raw')), [join(dir, 'adir.raw')], /is a directory/);
    expect(await readdir(dir)).toEqual(['adir.raw']);
  });
});

describe('usage errors exit 2', () => {
  let dir: string;
  beforeAll(async () => {
    dir = join(root, 'usage');
    await mkdir(dir);
  });

  function expectUsage(r: CliResult, mention: RegExp): void {
    const context = `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
    expect(r.code, context).toBe(2);
    expect(r.stderr.trim(), context).not.toBe('');
    expect(r.stderr, context).not.toContain('    at ');
    expect(r.stderr, context).toMatch(mention);
  }

  it('vhd create without --size', async () => {
    const p = join(dir, 'nosize.vhd');
    expectUsage(vhdvault('vhd', 'create', p), /--size/);
    expect(await readdir(dir)).toEqual([]);
  });

  it('vhd create --size banana', async () => {
    expectUsage(vhdvault('vhd', 'create', join(dir, 'banana.vhd'), '--size', 'banana'), /banana/);
    expect(await readdir(dir)).toEqual([]);
  });

  it('vhd create with sizes the format cannot hold', async () => {
    expectUsage(vhdvault('vhd', 'create', join(dir, 'odd.vhd'), '--size', '1000'), /multiple of 512/);
    expectUsage(vhdvault('vhd', 'create', join(dir, 'zero.vhd'), '--size', '0'), /positive/);
    expectUsage(vhdvault('vhd', 'create', join(dir, 'huge.vhd'), '--size', '3T'), /2040 GiB/);
    expectUsage(vhdvault('vhd', 'create', join(dir, 'bs.vhd'), '--size', '4M', '--block-size', '3M'), /block size/);
    expect(await readdir(dir)).toEqual([]);
  });

  it('vhd create with a block size too small for the disk', async () => {
    expectUsage(vhdvault('vhd', 'create', join(dir, 'small-blocks.vhd'), '--size', '300G', '--block-size', '4K'), /table entries.*larger block size/);
    expectUsage(vhdvault('vhd', 'create', join(dir, 'past-2t.vhd'), '--size', '2040G', '--block-size', '64K'), /2 TiB.*larger block size/);
    expect(await readdir(dir)).toEqual([]);
  });

  it('vhd create --parent with a --size other than the parent\'s', async () => {
    // The parent's own size (4M) is accepted: inputs.test.ts.
    expectUsage(vhdvault('vhd', 'create', join(dir, 'c.vhd'), '--parent', good, '--size', '8M'), /--size .*parent's size/);
    expect(await readdir(dir)).toEqual([]);
  });

  it('vhd convert to an unknown extension without --format', async () => {
    const out = join(dir, 'b.unknownext');
    expectUsage(vhdvault('vhd', 'convert', good, out), /--format/);
    expect(await readdir(dir)).toEqual([]);
    expect((await readFile(good)).equals(goodBytes)).toBe(true);
  });

  it('vhd convert --format with a value that is not a format', async () => {
    expectUsage(vhdvault('vhd', 'convert', good, join(dir, 'x.raw'), '--format', 'qcow2'), /qcow2/);
    expect(await readdir(dir)).toEqual([]);
  });

  it('unknown subcommand', () => {
    expectUsage(vhdvault('vhd', 'frobnicate', good), /unknown command/);
    expectUsage(vhdvault('frobnicate'), /unknown command/);
  });

  it('missing argument', () => {
    expectUsage(vhdvault('vhd', 'check'), /missing required argument/);
  });
});
