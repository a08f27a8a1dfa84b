/**
 * `npm start`: the product on embedded defaults, in well under a minute.
 * With qemu-storage-daemon installed, live backups of a running disk
 * (demo/live.ts); without it, backups of a disk file (demo/offline.ts).
 * Then a scheduled job run a few times: two disks, retention, verify,
 * replication and a health check (demo/job.ts). Everything happens in
 * temporary folders, removed at the end (--keep keeps them).
 */
import { jobDemo } from './demo/job.js';
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
// An interrupted first part already exited (130); a failed one set exitCode 1, which the job part keeps.
console.log('\n');
await jobDemo(keep);
