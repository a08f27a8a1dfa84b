import { open } from 'node:fs/promises';
import { VaultError } from '../util/errors.js';

/**
 * Disk image formats other than VHD, told by the magic bytes at their start
 * (each format's header as its specification, or QEMU's probe, defines it).
 * Such a file's bytes are a container, not the disk: read as a raw image it
 * would back up (or convert) the container, a "disk" that boots nothing.
 */
const MAGICS: Array<{ format: string; at: number; bytes: Buffer }> = [
  { format: 'qcow2', at: 0, bytes: Buffer.from([0x51, 0x46, 0x49, 0xfb]) }, // "QFI\xfb": qcow, qcow2 and qcow3
  { format: 'qed', at: 0, bytes: Buffer.from('QED\0', 'latin1') },
  { format: 'vmdk', at: 0, bytes: Buffer.from('KDMV', 'latin1') }, // a hosted sparse extent
  { format: 'vmdk', at: 0, bytes: Buffer.from('# Disk DescriptorFile', 'latin1') },
  { format: 'vmdk', at: 0, bytes: Buffer.from('COWD', 'latin1') }, // ESX sparse
  { format: 'vdi', at: 0x40, bytes: Buffer.from([0x7f, 0x10, 0xda, 0xbe]) }, // 0xbeda107f, little-endian
  { format: 'vhdx', at: 0, bytes: Buffer.from('vhdxfile', 'latin1') },
  { format: 'luks', at: 0, bytes: Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]) },
  { format: 'parallels', at: 0, bytes: Buffer.from('WithoutFreeSpace', 'latin1') },
  { format: 'parallels', at: 0, bytes: Buffer.from('WithouFreSpacExt', 'latin1') },
];

const PROBE = 0x40 + 4;

/** The format of the image at `path` when its start is another format's header; null for anything else (raw, VHD). */
export async function foreignFormat(path: string): Promise<string | null> {
  const fh = await open(path, 'r');
  try {
    const head = Buffer.alloc(PROBE);
    const { bytesRead } = await fh.read(head, 0, PROBE, 0);
    for (const m of MAGICS) {
      if (m.at + m.bytes.length <= bytesRead && head.subarray(m.at, m.at + m.bytes.length).equals(m.bytes)) return m.format;
    }
    return null;
  } finally {
    await fh.close();
  }
}

/**
 * A qcow2 (or other) image given where a disk is read: its container bytes are
 * not the disk. A caller that can read it another way (backup: through qemu-nbd)
 * catches this and does; the others say how.
 */
export class ForeignImageError extends VaultError {
  constructor(
    path: string,
    readonly format: string,
    fromRawFlag: string | undefined,
  ) {
    const serve = `serve it read-only with \`qemu-nbd -r -f ${format} -k <socket> <file>\` and give nbd+unix:///?socket=<socket>, or convert it with \`qemu-img convert -O raw\``;
    const raw = fromRawFlag ? `; ${fromRawFlag} reads the file's own bytes as the disk` : '';
    super(path, `is a ${format} image, not a raw disk or VHD: its bytes are a container, not the disk; ${serve}${raw}`);
  }
}
