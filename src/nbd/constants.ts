/**
 * The NBD wire's numbers (NetworkBlockDevice/nbd doc/proto.md; QEMU's
 * extensions in qemu docs/interop/nbd.rst). Shared by client and server.
 */

/** "NBDMAGIC": the first 8 bytes a server sends. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": the newstyle greeting's second magic, and every option's prefix. */
export const OPTION_MAGIC = 0x49484156454f5054n;
/** Prefix of every option reply. */
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server → client, 16 bits) and client flags (32 bits). */
export const HandshakeFlag = { FIXED_NEWSTYLE: 1, NO_ZEROES: 2 } as const;

export const Option = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const ERROR_BIT = 2 ** 31;
export const OptionReply = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: ERROR_BIT + 1,
  ERR_POLICY: ERROR_BIT + 2,
  ERR_INVALID: ERROR_BIT + 3,
  ERR_PLATFORM: ERROR_BIT + 4,
  ERR_TLS_REQD: ERROR_BIT + 5,
  ERR_UNKNOWN: ERROR_BIT + 6,
  ERR_SHUTDOWN: ERROR_BIT + 7,
  ERR_BLOCK_SIZE_REQD: ERROR_BIT + 8,
  ERR_TOO_BIG: ERROR_BIT + 9,
} as const;
export const isOptionError = (type: number) => type >= ERROR_BIT;

/** NBD_INFO_* carried in INFO replies and requested by INFO/GO. */
export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

/** Transmission flags (16 bits), sent with the export's size. */
export const TransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const Command = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;
export type CommandType = (typeof Command)[keyof typeof Command];

export const CommandFlag = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16 } as const;

/** Structured reply chunk types; DONE is the only reply flag. */
export const Chunk = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 2 ** 15 + 1,
  ERROR_OFFSET: 2 ** 15 + 2,
} as const;
export const ReplyFlag = { DONE: 1 } as const;
export const isChunkError = (type: number) => (type & 0x8000) !== 0;

/** `base:allocation` extent flags. */
export const AllocationFlag = { HOLE: 1, ZERO: 2 } as const;
/** `qemu:dirty-bitmap:<name>` extent flag. */
export const DIRTY = 1;
export const BASE_ALLOCATION = 'base:allocation';
export const DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';

/** Errors on the wire (Linux errno values, whatever the host). */
export const Errno = { EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 } as const;

/** A name for logs and error messages: `nameOf(Command, 7)` → "BLOCK_STATUS". */
export function nameOf(table: Record<string, number>, value: number): string {
  for (const [name, v] of Object.entries(table)) if (v === value) return name;
  return String(value);
}
