// Test-only preload (node -r): counts the CLI's filesystem changes and SIGKILLs
// the process right before the Nth one, so a crash test can stop a command
// between every two of its steps instead of at random moments.
//   VHDVAULT_KILL_AT=N          kill before the Nth change (0 or unset: never)
//   VHDVAULT_COUNT_OPS=<file>   write how many changes the run made, at exit
'use strict';
const fs = require('node:fs');
const { syncBuiltinESMExports } = require('node:module');

const killAt = Number(process.env.VHDVAULT_KILL_AT || 0);
const countFile = process.env.VHDVAULT_COUNT_OPS;
let count = 0;

function change() {
  count++;
  if (killAt && count === killAt) process.kill(process.pid, 'SIGKILL');
}

const p = fs.promises;
for (const name of ['rename', 'unlink', 'rm', 'mkdir', 'writeFile', 'link', 'copyFile', 'truncate']) {
  const original = p[name];
  p[name] = function (...args) {
    change();
    return original.apply(this, args);
  };
}
let handlesPatched = false;
const open = p.open;
p.open = async function (...args) {
  if (args[1] && args[1] !== 'r') change();
  const handle = await open.apply(this, args);
  if (!handlesPatched) {
    handlesPatched = true;
    const proto = Object.getPrototypeOf(handle);
    for (const name of ['write', 'writev', 'writeFile', 'truncate', 'sync', 'datasync']) {
      const original = proto[name];
      proto[name] = function (...a) {
        change();
        return original.apply(this, a);
      };
    }
  }
  return handle;
};
syncBuiltinESMExports();

if (countFile) process.on('exit', () => fs.writeFileSync(countFile, String(count)));
