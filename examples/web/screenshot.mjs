// Trains the page in headless Chromium and checks it: serves examples/web on
// localhost, drives Chromium through chromedriver (WebDriver over HTTP, no npm
// packages), waits for training to finish, saves a screenshot and fails unless the
// logged losses fall. Run `bash examples/web/build.sh` first.
//
//   node examples/web/screenshot.mjs [--out target/web-page.png] [--serve-only]
//
// CHROMIUM and CHROMEDRIVER name the binaries (default: on PATH). Chromium runs
// with --enable-unsafe-webgpu, on its SwiftShader adapter where there is no GPU.
import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { readFile, writeFile, mkdir } from "node:fs/promises";
import { dirname, extname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const flag = (name, fallback) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : fallback;
};
const out = resolve(flag("--out", join(here, "../../target/web-page.png")));
const timeoutMs = 1000 * Number(process.env.WEB_TRAIN_TIMEOUT_S ?? 300);

const types = {
  ".html": "text/html",
  ".js": "text/javascript",
  ".wasm": "application/wasm",
};

function serve(port) {
  const server = createServer(async (req, res) => {
    const path = new URL(req.url, "http://localhost").pathname;
    const file = join(here, path === "/" ? "index.html" : path);
    if (!file.startsWith(here)) {
      res.writeHead(403).end();
      return;
    }
    try {
      const body = await readFile(file);
      res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream" });
      res.end(body);
    } catch {
      res.writeHead(404).end("not found");
    }
  });
  return new Promise((ok) => server.listen(port, "127.0.0.1", () => ok(server)));
}

const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

async function webdriver(base, method, path, body) {
  const res = await fetch(base + path, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await res.json();
  if (!res.ok) throw new Error(`${method} ${path}: ${JSON.stringify(json.value ?? json)}`);
  return json.value;
}

async function main() {
  if (args.includes("--serve-only")) {
    const port = Number(process.env.PORT ?? 8000);
    await serve(port);
    console.log(`serving examples/web on http://localhost:${port}/ (Ctrl-C to stop)`);
    return;
  }
  const server = await serve(0);
  const url = `http://127.0.0.1:${server.address().port}/`;
  const driverPort = 9600 + Math.floor(Math.random() * 300);
  const driver = spawn(process.env.CHROMEDRIVER ?? "chromedriver", [`--port=${driverPort}`], {
    stdio: ["ignore", "ignore", "inherit"],
  });
  const base = `http://127.0.0.1:${driverPort}`;
  let session;
  try {
    for (let i = 0; ; i++) {
      try {
        if ((await webdriver(base, "GET", "/status")).ready) break;
      } catch (e) {
        if (i > 100) throw new Error(`chromedriver did not start: ${e}`);
      }
      await sleep(100);
    }
    const chromeOptions = {
      args: [
        "--headless=new",
        "--enable-unsafe-webgpu",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=900,620",
      ],
    };
    if (process.env.CHROMIUM) chromeOptions.binary = process.env.CHROMIUM;
    session = (
      await webdriver(base, "POST", "/session", {
        capabilities: { alwaysMatch: { browserName: "chrome", "goog:chromeOptions": chromeOptions } },
      })
    ).sessionId;
    const s = `/session/${session}`;
    await webdriver(base, "POST", `${s}/url`, { url });
    const started = Date.now();
    let state;
    for (;;) {
      state = await webdriver(base, "POST", `${s}/execute/sync`, {
        script: `return { done: !!window.bnDone, error: window.bnError ?? null,
                 losses: window.bnLosses ?? null,
                 status: document.getElementById("status").textContent,
                 adapter: document.getElementById("adapter").textContent + "\\n" +
                          document.getElementById("gpuinfo").textContent };`,
        args: [],
      });
      if (state.done || state.error) break;
      if (Date.now() - started > timeoutMs) {
        throw new Error(`training did not finish in ${timeoutMs / 1000} s: ${state.status}`);
      }
      await sleep(500);
    }
    const png = await webdriver(base, "GET", `${s}/screenshot`);
    await mkdir(dirname(out), { recursive: true });
    await writeFile(out, Buffer.from(png, "base64"));
    console.log(`${state.adapter}\n${state.status}\nscreenshot: ${out}`);
    console.log(`trained in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    if (state.error) throw new Error(`the page failed: ${state.error}`);
    const losses = JSON.parse(state.losses);
    const mean = (v) => v.reduce((a, b) => a + b, 0) / v.length;
    const [first, last] = [mean(losses.slice(0, 10)), mean(losses.slice(-10))];
    console.log(`losses: ${losses.length} steps, first ten ${first.toFixed(4)}, last ten ${last.toFixed(4)}`);
    if (!(losses.every(Number.isFinite) && last < 0.6 * first)) {
      throw new Error(`the loss did not fall: ${JSON.stringify(losses)}`);
    }
  } finally {
    if (session) await webdriver(base, "DELETE", `/session/${session}`).catch(() => {});
    driver.kill();
    server.close();
  }
}

main().catch((e) => {
  console.error(`examples/web: ${e.message}`);
  process.exit(1);
});
