// Test-only preload (node -r): the CLI's writes to /proc/sys/vm/drop_caches are
// appended to $VHDVAULT_DROP_LOG and never reach the kernel, so a test can see
// whether a command would drop the machine's page cache without dropping it.
'use strict';
const fs = require('node:fs');
const { resolve } = require('node:path');
const { syncBuiltinESMExports } = require('node:module');

const DROP = '/proc/sys/vm/drop_caches';
const log = process.env.VHDVAULT_DROP_LOG;
const isDrop = (path) => (typeof path === 'string' || path instanceof URL) && resolve(String(path instanceof URL ? path.pathname : path)) === DROP;
const record = (data) => fs.appendFileSync(log, `${String(data).trim()}\n`);

const p = fs.promises;
const writeFile = p.writeFile;
p.writeFile = function (path, data, ...rest) {
  if (!isDrop(path)) return writeFile.call(this, path, data, ...rest);
  record(data);
  return Promise.resolve();
};
const writeFileSync = fs.writeFileSync;
fs.writeFileSync = function (path, data, ...rest) {
  if (!isDrop(path)) return writeFileSync.call(this, path, data, ...rest);
  record(data);
};
// Any other way in (open, then write) is recorded and refused.
const open = p.open;
p.open = function (path, ...rest) {
  if (!isDrop(path)) return open.call(this, path, ...rest);
  record('open');
  return Promise.reject(Object.assign(new Error(`EACCES: ${DROP}`), { code: 'EACCES', path: DROP }));
};
const openSync = fs.openSync;
fs.openSync = function (path, ...rest) {
  if (!isDrop(path)) return openSync.call(this, path, ...rest);
  record('open');
  throw Object.assign(new Error(`EACCES: ${DROP}`), { code: 'EACCES', path: DROP });
};
syncBuiltinESMExports();
