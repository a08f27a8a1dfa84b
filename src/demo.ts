/**
 * `npm start`: the main job on an embedded default, in well under a minute.
 * With qemu-storage-daemon installed, live backups of a running disk
 * (demo/live.ts); without it, backups of a disk file (demo/offline.ts).
 * Everything happens in a temporary folder, removed at the end (--keep keeps it).
 */
import { liveDemo } from './demo/live.js';
import { offlineDemo } from './demo/offline.js';
import { QEMU_PACKAGES, qemuTools } from './demo/qsd.js';

const keep = process.argv.includes('--keep');
const qemu = qemuTools();
if (qemu.problem === null) {
  await liveDemo(keep, qemu.daemon);
} else {
  console.log(`${qemu.problem}: for the live demo, install QEMU's tools (Debian: apt-get install ${QEMU_PACKAGES}); running the offline demo.\n`);
  await offlineDemo(keep);
}
