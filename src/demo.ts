/**
 * `npm start`: the product on embedded defaults, in well under a minute.
 * With qemu-storage-daemon installed, live backups of a running disk
 * (demo/live.ts); without it, backups of a disk file (demo/offline.ts).
 * With QEMU and a guest's packages installed, a whole-VM backup of a real
 * Linux guest, restored and boot-checked (demo/vm.ts).
 * Then a scheduled job run a few times: two disks, retention, verify,
 * replication and a health check (demo/job.ts). Everything happens in
 * temporary folders, removed at the end (--keep keeps them).
 */
import { jobDemo } from './demo/job.js';
import { guestMissing } from './demo/guest.js';
import { liveDemo } from './demo/live.js';
import { offlineDemo } from './demo/offline.js';
import { QEMU_PACKAGES, qemuTools } from './demo/qsd.js';
import { vmDemo } from './demo/vm.js';

const keep = process.argv.includes('--keep');
const qemu = qemuTools();
if (qemu.problem === null) {
  await liveDemo(keep, qemu.daemon);
} else {
  console.log(`${qemu.problem}: for the live demo, install QEMU's tools (Debian: apt-get install ${QEMU_PACKAGES}); running the offline demo.\n`);
  await offlineDemo(keep);
}
// An interrupted first part already exited (130); a failed one set exitCode 1, which the later parts keep.
console.log('\n');
if (guestMissing === undefined) await vmDemo(keep);
else console.log(`${guestMissing}: for the whole-VM demo, install them (Debian: apt-get install qemu-system-x86 linux-image-cloud-amd64 busybox-static qemu-guest-agent e2fsprogs); skipping it.`);
console.log('\n');
await jobDemo(keep);
