import type { StorageCapabilities } from '../../storage/Storage.js';
import type { LayoutName } from '../metadata.js';
import { dirLayout } from './dir.js';
import type { Layout } from './Layout.js';
import { objectsLayout } from './objects.js';
import { vhdLayout } from './vhd.js';

const LAYOUTS: Record<LayoutName, Layout> = { dir: dirLayout, vhd: vhdLayout, objects: objectsLayout };

/** The driver of a layout by its name (as vhdvault.json and each backup's metadata record it). */
export function layoutNamed(name: LayoutName): Layout {
  return LAYOUTS[name];
}

/** A new repository's layout when none is asked for: the exploded VHD directories where files can be renamed, else block objects. */
export function defaultLayout(capabilities: StorageCapabilities): Layout {
  return dirLayout.unsupportedOn(capabilities) === null ? dirLayout : objectsLayout;
}

/** The backup id when `name` is a backup's data that the `vhd` tools read as a VHD, in any layout; else null. */
export function vhdDataId(name: string): string | null {
  for (const layout of Object.values(LAYOUTS)) {
    const id = layout.vhdDataId(name);
    if (id !== null) return id;
  }
  return null;
}

/** What the names of backups' data end with, in any layout. */
export function dataSuffixes(): string[] {
  return Object.values(LAYOUTS).map((layout) => layout.dataSuffix);
}
