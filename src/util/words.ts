/** `1 backup`, `2 backups`: a count and its noun, in the right number. */
export const plural = (n: number, noun: string): string => `${n} ${noun}${n === 1 ? '' : 's'}`;
