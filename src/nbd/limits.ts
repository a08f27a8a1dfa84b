/**
 * What a peer may make us hold or do. A hostile peer cannot force allocation
 * beyond these (nbdkit's limits, which qemu and libnbd live within).
 */

/** Largest READ or WRITE payload: qemu's own maximum (32 MiB); larger requests are refused. */
export const MAX_REQUEST = 32 * 1024 * 1024;
/** Export names, meta context queries and error messages (the spec's 4096-byte string cap). */
export const MAX_STRING = 4096;
/** Option payloads: the largest legitimate one holds a few strings. */
export const MAX_OPTION_DATA = 64 * 1024;
/** Options one handshake may send before the server gives up on it. */
export const MAX_OPTIONS = 64;
/** Meta context queries in one option. */
export const MAX_QUERIES = 32;
/** Requests one connection may have in flight; the server stops reading beyond this. */
export const MAX_IN_FLIGHT = 64;
/** BLOCK_STATUS descriptors one chunk may carry (8 bytes each): 1 MiB. */
export const MAX_EXTENTS = 128 * 1024;
/** Bytes buffered from a socket before reading pauses. */
export const READ_HIGH_WATER = 4 * 1024 * 1024;
/** Bytes a server buffers from one client before reading pauses (its next requests wait in the kernel). */
export const SERVER_INPUT_HIGH_WATER = 1024 * 1024;
/** Bytes of small replies (errors, acks, not budgeted) a client may leave unread before we stop reading its requests. */
export const SMALL_REPLY_HIGH_WATER = 1024 * 1024;
/** Bytes of READ replies and WRITE payloads in progress on one connection (one larger request is admitted alone). */
export const CONNECTION_BUDGET = 4 * 1024 * 1024;
/** The same over all connections of a server. */
export const SERVER_BUDGET = 64 * 1024 * 1024;
/** Connections in the transmission phase (an export chosen); more are refused at GO. */
export const MAX_CONNECTIONS = 64;
/** Connections still negotiating; more are refused as they connect. */
export const MAX_NEGOTIATING = 16;
/** A connection that has not chosen an export in this long is closed (ms). */
export const HANDSHAKE_TIMEOUT = 10_000;
/**
 * A client whose replies have not moved on for this long, while some are
 * waiting to be sent, is hung up on: what it holds of the server's budget
 * would keep every other client's reads waiting for as long as it stays.
 * A live client reads its replies as they come (QEMU and libnbd do).
 */
export const REPLY_STALL_MS = 60_000;
