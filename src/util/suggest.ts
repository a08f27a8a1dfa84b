/** Edit distance (insertions, deletions, substitutions) between two words. */
function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++) row[j] = Math.min(previous[j]! + 1, row[j - 1]! + 1, previous[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    previous = row;
  }
  return previous[b.length]!;
}

/** What `word` was probably meant to be among `known`: the same but for case, else one at most 2 edits away; or null. */
export function nearest(word: string, known: readonly string[]): string | null {
  const lower = word.toLowerCase();
  return known.find((k) => k.toLowerCase() === lower) ?? known.find((k) => Math.abs(k.length - word.length) <= 2 && editDistance(k.toLowerCase(), lower) <= 2) ?? null;
}
