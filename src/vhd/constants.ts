/** Fixed facts of the VHD format (Microsoft VHD specification, October 2006). */

export const SECTOR_SIZE = 512;
export const FOOTER_SIZE = 512;
export const HEADER_SIZE = 1024;
export const HEADER_OFFSET = FOOTER_SIZE;
export const BAT_OFFSET = HEADER_OFFSET + HEADER_SIZE;
export const DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024;
export const MIN_BLOCK_SIZE = 4096;
export const MAX_BLOCK_SIZE = 256 * 1024 * 1024;

export const FOOTER_COOKIE = 'conectix';
export const HEADER_COOKIE = 'cxsparse';
export const FOOTER_FEATURES = 0x00000002;
export const FORMAT_VERSION = 0x00010000;
export const HEADER_VERSION = 0x00010000;

/** Offset field of a fixed disk's footer and of the dynamic header: "no next structure". */
export const NO_OFFSET = 0xffffffffffffffffn;
export const BAT_UNUSED = 0xffffffff;

export const DiskType = {
  fixed: 2,
  dynamic: 3,
  differencing: 4,
} as const;
export type DiskTypeName = keyof typeof DiskType;

/**
 * Most BAT entries we create or open: 64 Mi entries (a 256 MiB table), so a
 * hostile header cannot make us allocate gigabytes. 2 MiB blocks need at most
 * 1 Mi entries; 4 KiB blocks reach 256 GiB.
 */
export const MAX_TABLE_ENTRIES = 64 * 1024 * 1024;

/** A BAT entry is a 32-bit sector number; 0xFFFFFFFF means unallocated. */
export const MAX_BAT_SECTOR = 0xfffffffe;

/** 2040 GiB: the largest size the format (and qemu, Hyper-V) accepts. */
export const MAX_DISK_SIZE = 0xff000000 * SECTOR_SIZE;

/** Maximum CHS geometry; qemu treats it as "use current size, not CHS". */
export const MAX_CYLINDERS = 65535;
export const MAX_HEADS = 16;
export const MAX_SECTORS_PER_TRACK = 255;

/** What we write in the footer's creator fields. */
export const CREATOR_APP = 'vhdv';
export const CREATOR_VERSION = 0x00010000;
export const CREATOR_HOST_OS = 'Wi2k';

/** Seconds between the Unix epoch and the VHD epoch, 2000-01-01T00:00:00Z. */
export const VHD_EPOCH_UNIX_SECONDS = 946684800;
