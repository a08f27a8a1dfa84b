/** Seconds a copy-before-write may take before the backup fails (QEMU's cbw-timeout): the CLI's help and the run share it. */
export const DEFAULT_CBW_TIMEOUT = 45;
/** Seconds a booted VM backup has to answer (vm boot-check --timeout). */
export const DEFAULT_BOOT_TIMEOUT_S = 300;
/** The libvirt vm restore --define registers the restored VM in, unless --connect says another. */
export const DEFAULT_LIBVIRT_URI = 'qemu:///system';
