import type { Compression } from './compression.js';
import type { DiskTypeName } from './constants.js';
import { fromVhdTimestamp } from './timestamp.js';
import { VhdChain } from './VhdChain.js';
import { VhdDirectory } from './VhdDirectory.js';
import { openDisk } from './openDisk.js';
import type { VhdDisk } from './disk.js';
import { bytesUnder } from '../util/files.js';
import type { Geometry } from './geometry.js';
import { decodeLocatorPath, PLATFORM_NONE } from './parentLocator.js';

/** What `vhd info --json` prints. */
export interface VhdDescription {
  path: string;
  /** When `path` is a Xen Orchestra alias (`*.alias.vhd`): the VHD it points to, which is what is described. */
  aliasTarget: string | null;
  type: DiskTypeName;
  /** Virtual size in bytes, as qemu reads it. */
  size: number;
  currentSize: number;
  originalSize: number;
  /** Fixed disks have no blocks; they are described as fully allocated 2 MiB blocks. */
  blockSize: number;
  blockCount: number;
  allocatedBlocks: number;
  uuid: string;
  parentUuid: string | null;
  parentName: string | null;
  parentLocators: Array<{ platform: string; path: string | null }>;
  creator: string;
  creatorVersion: string;
  creatorHostOs: string;
  createdAt: string;
  geometry: Geometry;
  storage: 'file' | 'directory';
  /** Codec of a directory's files; "none" for files. */
  compression: Compression;
  /** Bytes the disk occupies: the file's size, or the sum of the directory's files. */
  storedBytes: number;
  /** A differencing disk's chain, top first; null when it cannot be opened (see chainProblem). */
  chain: Array<{ path: string; type: DiskTypeName; uuid: string; storage: 'file' | 'directory' }> | null;
  chainProblem?: string;
}


type ChainPart = Pick<VhdDescription, 'chain' | 'chainProblem'>;

const storageOf = (vhd: VhdDisk): VhdDescription['storage'] => (vhd instanceof VhdDirectory ? 'directory' : 'file');

/** An open chain's members, top first, as `vhd info` lists them. */
export function chainMembers(chain: { members: VhdDisk[] }): ChainPart {
  return { chain: chain.members.map((m) => ({ path: m.path, type: m.footer.diskType, uuid: m.footer.uuid, storage: storageOf(m) })) };
}

async function describeChain(path: string): Promise<ChainPart> {
  try {
    const chain = await VhdChain.open(path);
    await chain.close();
    return chainMembers(chain);
  } catch (err) {
    return { chain: null, chainProblem: (err as Error).message };
  }
}

const printable = (s: string) => s.replace(/\0/g, '');

export async function describeVhd(path: string): Promise<VhdDescription> {
  const vhd = await openDisk(path);
  try {
    const chain = vhd.footer.diskType === 'differencing' ? await describeChain(path) : chainMembers({ members: [vhd] });
    return await describeDisk(path, vhd, { ...chain, storedBytes: await bytesUnder([vhd.path]) });
  } finally {
    await vhd.close();
  }
}

/** An open VHD (a file, a directory, or a backup read through its repository), given its chain and the bytes it occupies. */
export async function describeDisk(path: string, vhd: VhdDisk, known: ChainPart & { storedBytes: number }): Promise<VhdDescription> {
  const { footer, header } = vhd;
  const differencing = footer.diskType === 'differencing';
  const parentLocators: VhdDescription['parentLocators'] = [];
  if (differencing && header) {
    for (const [index, loc] of header.parentLocators.entries()) {
      if (loc.platformCode === PLATFORM_NONE) continue;
      const data = await vhd.readLocatorData(index);
      parentLocators.push({ platform: printable(loc.platformCode), path: data ? decodeLocatorPath(data) : null });
    }
  }
  const v = footer.creatorVersion;
  let allocatedBlocks = 0;
  for (let b = 0; b < vhd.blockCount; b++) if (vhd.isAllocated(b)) allocatedBlocks++;
  return {
    path,
    aliasTarget: vhd.path !== path ? vhd.path : null,
    type: footer.diskType,
    size: vhd.size,
    currentSize: footer.currentSize,
    originalSize: footer.originalSize,
    blockSize: vhd.blockSize,
    blockCount: vhd.blockCount,
    allocatedBlocks,
    uuid: footer.uuid,
    parentUuid: differencing && header ? header.parentUuid : null,
    parentName: differencing && header ? header.parentName : null,
    parentLocators,
    creator: printable(footer.creatorApp),
    creatorVersion: `${v >>> 16}.${v & 0xffff}`,
    creatorHostOs: printable(footer.creatorHostOs),
    createdAt: fromVhdTimestamp(footer.timestamp).toISOString(),
    geometry: footer.geometry,
    storage: storageOf(vhd),
    compression: vhd instanceof VhdDirectory ? vhd.compression : 'none',
    storedBytes: known.storedBytes,
    chain: known.chain,
    ...(known.chainProblem === undefined ? {} : { chainProblem: known.chainProblem }),
  };
}

export function formatDescription(d: VhdDescription): string {
  const g = d.geometry;
  const lines = [
    `path:             ${d.path}`,
    ...(d.aliasTarget ? [`alias of:         ${d.aliasTarget}`] : []),
    `type:             ${d.type}`,
    `size:             ${d.size} bytes`,
    `block size:       ${d.blockSize}`,
    `blocks:           ${d.allocatedBlocks} of ${d.blockCount} allocated`,
    `uuid:             ${d.uuid}`,
    `creator:          ${d.creator} ${d.creatorVersion} (${d.creatorHostOs})`,
    `created:          ${d.createdAt}`,
    `geometry (CHS):   ${g.cylinders}/${g.heads}/${g.sectorsPerTrack}`,
    `storage:          ${d.storage}${d.storage === 'directory' ? ` (compression ${d.compression})` : ''}`,
    `stored bytes:     ${d.storedBytes}`,
  ];
  if (d.parentUuid !== null) {
    lines.push(`parent uuid:      ${d.parentUuid}`, `parent name:      ${d.parentName}`);
    for (const l of d.parentLocators) lines.push(`parent locator:   ${l.platform} ${l.path ?? '(unreadable)'}`);
    if (d.chain) d.chain.forEach((m, i) => lines.push(`chain[${i}]:        ${m.type} ${m.path}`));
    else lines.push(`chain:            cannot be opened: ${d.chainProblem}`);
  }
  return lines.join('\n');
}
