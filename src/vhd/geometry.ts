import { MAX_CYLINDERS, MAX_HEADS, MAX_SECTORS_PER_TRACK, SECTOR_SIZE } from './constants.js';

export interface Geometry {
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
}

export const MAX_GEOMETRY: Geometry = {
  cylinders: MAX_CYLINDERS,
  heads: MAX_HEADS,
  sectorsPerTrack: MAX_SECTORS_PER_TRACK,
};

export function geometrySectors(g: Geometry): number {
  return g.cylinders * g.heads * g.sectorsPerTrack;
}

export function isMaxGeometry(g: Geometry): boolean {
  return geometrySectors(g) === geometrySectors(MAX_GEOMETRY);
}

/** The CHS geometry of the VHD specification's appendix for a disk of `size` bytes. */
export function specGeometry(size: number): Geometry {
  let totalSectors = Math.floor(size / SECTOR_SIZE);
  const maxSectors = geometrySectors(MAX_GEOMETRY);
  if (totalSectors > maxSectors) totalSectors = maxSectors;

  let sectorsPerTrack: number;
  let heads: number;
  let cylinderTimesHeads: number;
  if (totalSectors >= 65535 * 16 * 63) {
    sectorsPerTrack = 255;
    heads = 16;
    cylinderTimesHeads = Math.floor(totalSectors / sectorsPerTrack);
  } else {
    sectorsPerTrack = 17;
    cylinderTimesHeads = Math.floor(totalSectors / sectorsPerTrack);
    heads = Math.floor((cylinderTimesHeads + 1023) / 1024);
    if (heads < 4) heads = 4;
    if (cylinderTimesHeads >= heads * 1024 || heads > 16) {
      sectorsPerTrack = 31;
      heads = 16;
      cylinderTimesHeads = Math.floor(totalSectors / sectorsPerTrack);
    }
    if (cylinderTimesHeads >= heads * 1024) {
      sectorsPerTrack = 63;
      heads = 16;
      cylinderTimesHeads = Math.floor(totalSectors / sectorsPerTrack);
    }
  }
  const cylinders = Math.floor(cylinderTimesHeads / heads);
  return { cylinders, heads, sectorsPerTrack };
}

/**
 * The geometry we write. The spec's geometry when it describes exactly `size`
 * bytes; otherwise the maximum geometry, which every qemu version reads as
 * "the size is current_size" (docs/design/01-vhd-files.md §1.6).
 */
export function geometryForSize(size: number): Geometry {
  const g = specGeometry(size);
  return geometrySectors(g) * SECTOR_SIZE === size ? g : MAX_GEOMETRY;
}
