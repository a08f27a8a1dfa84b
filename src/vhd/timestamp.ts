import { VHD_EPOCH_UNIX_SECONDS } from './constants.js';

/** VHD timestamps count seconds since 2000-01-01T00:00:00Z in an unsigned 32-bit field. */
export function toVhdTimestamp(date: Date): number {
  const seconds = Math.floor(date.getTime() / 1000) - VHD_EPOCH_UNIX_SECONDS;
  return Math.min(Math.max(seconds, 0), 0xffffffff);
}

export function fromVhdTimestamp(timestamp: number): Date {
  return new Date((timestamp + VHD_EPOCH_UNIX_SECONDS) * 1000);
}
