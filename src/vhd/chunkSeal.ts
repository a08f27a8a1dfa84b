/**
 * How an encrypted repository seals the files of a VHD directory
 * (docs/design/12-encryption.md): each file's stored bytes (after
 * compression) are sealed, and opened before they are decompressed. The
 * format code only applies it; the keys and what each file is bound to live
 * with the repository.
 */
export interface ChunkSeal {
  /** Bytes a sealed file has beyond its stored content. */
  readonly overhead: number;
  /** `name`: the file's name inside the directory (`footer`, `blocks/1/234`). */
  seal(name: string, stored: Buffer): Buffer;
  /** The stored content of a sealed file, or a VaultError naming `file`. */
  open(name: string, sealed: Buffer, file: string): Buffer;
}
