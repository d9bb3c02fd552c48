// Shared helpers for the compatibility tests: the sandbox of the current stage
// (debug mode or a real one through warren's API), scratch directories,
// polling, and (for secured.test.mjs) a private envd.
import { spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { once } from 'node:events'
import { closeSync, openSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Sandbox } from 'e2b'

/** The account the SDK acts as when a call names no user (E2B templates' `user`). */
export const USER = 'user'
export const HOME = '/home/user'

/** Path of the envd binary `make build` produces. */
export const ENVD_BIN = fileURLToPath(new URL('../../bin/envd', import.meta.url))

/** isDebug: the debug stage (E2B_DEBUG=true), envd on localhost:49983, no API. */
export const isDebug = (process.env.E2B_DEBUG ?? '').toLowerCase() === 'true'

/** apiKey is the key run.sh gives warren and the tests (E2B_API_KEY). */
export const apiKey = process.env.E2B_API_KEY

/**
 * debugSandbox is `Sandbox.create()` in the SDK's debug mode: no API call,
 * envd at http://localhost:49983 (started by run.sh), no access token.
 */
export async function debugSandbox() {
  if (!isDebug) {
    throw new Error('E2B_DEBUG=true is required: run the tests through ./run.sh')
  }
  const sandbox = await Sandbox.create()
  if (sandbox.sandboxId !== 'debug_sandbox_id') {
    throw new Error(`expected the SDK's debug sandbox, got ${sandbox.sandboxId}`)
  }
  return sandbox
}

/**
 * testSandbox is the sandbox of the stage the file runs in: the debug
 * sandbox (debug stage), or a new sandbox from warren's API (api and domain
 * stages, E2B_API_KEY set) with `metadata.compat = label` and a 15 min
 * lifetime. Give the result to `releaseSandbox` in an `after` hook.
 */
export async function testSandbox(label, opts = {}) {
  if (isDebug) return debugSandbox()
  if (!apiKey) throw new Error('E2B_API_KEY is not set: run the tests through ./run.sh')
  return Sandbox.create({ timeoutMs: 15 * 60_000, ...opts, metadata: { compat: label, ...opts.metadata } })
}

/** releaseSandbox kills a sandbox testSandbox made through the API. */
export async function releaseSandbox(sandbox) {
  if (!sandbox || isDebug) return
  await sandbox.kill()
}

/** uniqueName returns `prefix-<random hex>`, so reruns never collide. */
export function uniqueName(prefix) {
  return `${prefix}-${randomBytes(4).toString('hex')}`
}

/**
 * scratchDir makes a fresh directory under the user's home through the SDK and
 * returns its absolute path; remove it with `sandbox.files.remove(dir)`.
 */
export async function scratchDir(sandbox, prefix) {
  const dir = `${HOME}/${uniqueName(prefix)}`
  if (!(await sandbox.files.makeDir(dir))) throw new Error(`scratch dir ${dir} already existed`)
  return dir
}

/**
 * waitFor polls `check` until it returns a truthy value or `timeoutMs` passes,
 * then fails with `what` (the thing that never happened).
 */
export async function waitFor(what, check, timeoutMs = 5000, intervalMs = 50) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = await check()
    if (value) return value
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, intervalMs))
  }
}

/** rejection returns what `promise` rejects with, or fails when it resolves. */
export async function rejection(promise) {
  try {
    const value = await promise
    throw new Error(`expected a rejection, got ${JSON.stringify(value)}`, { cause: 'resolved' })
  } catch (err) {
    if (err?.cause === 'resolved') throw err
    return err
  }
}

async function freePort() {
  const server = createServer()
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const { port } = server.address()
  server.close()
  await once(server, 'close')
  return port
}

/**
 * startPrivateEnvd runs bin/envd on a free loopback port, for tests that
 * change envd's state for good (an access token set through /init), and waits
 * for GET /health 204. Its output goes to `<name>.log` in
 * $WARREN_COMPAT_LOG_DIR (run.sh prints that directory on failure), its PID
 * to `<name>.pid` there. `stop()` kills it by PID.
 */
export async function startPrivateEnvd(name) {
  const port = await freePort()
  const logDir = process.env.WARREN_COMPAT_LOG_DIR ?? tmpdir()
  const logPath = join(logDir, `${name}.log`)
  const log = openSync(logPath, 'w')
  const child = spawn(ENVD_BIN, ['--host', '127.0.0.1', '--port', String(port)], {
    stdio: ['ignore', log, log],
  })
  closeSync(log)
  // run.sh kills it by this PID should the test runner die before stop().
  writeFileSync(join(logDir, `${name}.pid`), `${child.pid}\n`)
  const exited = once(child, 'exit')
  const url = `http://127.0.0.1:${port}`
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return
    child.kill('SIGTERM')
    const timer = setTimeout(() => child.kill('SIGKILL'), 5000)
    await exited
    clearTimeout(timer)
  }
  try {
    await waitFor(`${url}/health to answer 204 (log ${logPath})`, async () => {
      if (child.exitCode !== null) throw new Error(`envd exited with ${child.exitCode}; log ${logPath}`)
      const res = await fetch(`${url}/health`).catch(() => null)
      return res?.status === 204
    }, 10_000, 100)
  } catch (err) {
    await stop()
    throw err
  }
  return { url, pid: child.pid, stop }
}

/** sandboxUrl is E2B_SANDBOX_URL: warren's single origin in the api stage. */
export const sandboxUrl = process.env.E2B_SANDBOX_URL

/**
 * proxyFetch fetches `path` on `port` of sandbox `id` through warren's
 * single origin, routed by the E2b-Sandbox-Id/E2b-Sandbox-Port headers (README
 * mode A), as the SDK routes its own envd calls.
 */
export function proxyFetch(id, port, path = '/', init = {}) {
  if (!sandboxUrl) throw new Error('E2B_SANDBOX_URL is not set: run the tests through ./run.sh api')
  return fetch(new URL(path, sandboxUrl), {
    ...init,
    headers: { 'E2b-Sandbox-Id': id, 'E2b-Sandbox-Port': String(port), ...init.headers },
  })
}

/**
 * startHttpServer runs `python3 -m http.server` on port inside the sandbox
 * (in the background, serving a fresh directory whose index.html holds a
 * random marker; `bind` e.g. 127.0.0.1) and returns { marker, handle }.
 * The caller waits for it with its own probe: only it knows the route.
 */
export async function startHttpServer(sandbox, port, bind) {
  const marker = uniqueName(`served-on-${port}`)
  const dir = `/tmp/${marker}`
  await sandbox.files.write(`${dir}/index.html`, marker)
  const handle = await sandbox.commands.run(
    `exec python3 -m http.server ${port} --directory ${dir}${bind ? ` --bind ${bind}` : ''}`,
    { background: true, timeoutMs: 0 },
  )
  return { marker, handle }
}
