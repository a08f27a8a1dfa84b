import type { Extent } from './transmission.js';

/** One piece of a read: bytes, or a run the export knows reads as zeros. */
export type ReadPiece = { offset: number; data: Buffer } | { offset: number; hole: number };

/**
 * What the server serves. The session has already checked every request
 * against `size` and the limits (limits.ts): an export sees only requests
 * that fit. To refuse one, throw ExportError with an errno.
 */
export interface NbdExport {
  readonly size: number;
  readonly writable: boolean;
  /** The bytes of [offset, offset + length), in order, as data and holes that cover the range exactly. */
  read(offset: number, length: number): Promise<ReadPiece[]>;
  /** `base:allocation` from `offset`: extents in order, covering at least one byte and at most `length`. */
  allocation(offset: number, length: number): Promise<Extent[]>;
  write?(offset: number, data: Buffer, fua: boolean): Promise<void>;
  writeZeroes?(offset: number, length: number, fua: boolean): Promise<void>;
  trim?(offset: number, length: number, fua: boolean): Promise<void>;
  /** Make every completed write durable. */
  flush?(): Promise<void>;
}

/** The exports a server offers, by name. */
export interface ExportCatalog {
  /** For NBD_OPT_LIST: every export's name and a description. */
  list(): Promise<Array<{ name: string; description: string }>>;
  /** The export a client names ("" is the default), or null when there is none by that name. Opened after GO. */
  open(name: string): Promise<NbdExport | null>;
  /** Flush and release everything (the server is stopping). */
  close(): Promise<void>;
}
