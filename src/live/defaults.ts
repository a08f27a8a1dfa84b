/** Seconds a copy-before-write may take before the backup fails (QEMU's cbw-timeout): the CLI's help and the run share it. */
export const DEFAULT_CBW_TIMEOUT = 45;
