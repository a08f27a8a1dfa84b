/** The dashboard's document (`/api/dashboard`), versioned as every `--json` document is (docs/json.md). */
export const DASHBOARD_FORMAT = 'vhdvault-dashboard/1';
