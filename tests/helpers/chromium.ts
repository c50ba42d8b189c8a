/**
 * A headless Chromium for tests that look at a page (Debian's `chromium` package, driven by
 * playwright-core). Needs `--allow-run` for it and `--allow-sys=homedir`.
 *
 * @module
 */
import type { Browser } from "playwright-core";

/** Where Debian installs Chromium. */
export const CHROMIUM = "/usr/bin/chromium";

/** Launches Chromium headless; close the browser when done. */
export async function launchChromium(): Promise<Browser> {
  try {
    await Deno.stat(CHROMIUM);
  } catch {
    throw new Error(`${CHROMIUM} is missing: apt-get install -y chromium`);
  }
  // playwright-core probes /proc/sys/fs/binfmt_misc/WSLInterop when it loads (is-wsl), a
  // path Deno only lets --allow-all read; this variable makes that probe lazy.
  Deno.env.set("__IS_WSL_TEST__", "1");
  const { chromium } = await import("playwright-core");
  return await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"],
  });
}
