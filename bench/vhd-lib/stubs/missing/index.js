'use strict'
// Stands in for a package the registry this bench installs from lacks (see ../../package.json's
// overrides); vhd-lib loads it, a merge of VHD directories never calls it. Any use fails loudly.
const missing = () => {
  throw new Error('a package stubbed in bench/vhd-lib (absent from the registry) was called')
}
module.exports = new Proxy(missing, { get: (_, name) => (name === '__esModule' ? false : missing) })
