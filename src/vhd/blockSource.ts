/** A virtual disk read block by block: a VHD chain or a raw image. */
export interface BlockSource {
  readonly size: number;
  readonly blockSize: number;
  readonly blockCount: number;
  /**
   * `blockSize` bytes (zero past the disk's end), or null when known to be all
   * zeros. The caller owns the buffer; it may hand it to releaseBuffer() when done.
   */
  readBlock(block: number): Promise<Buffer | null>;
  close(): Promise<void>;
}
