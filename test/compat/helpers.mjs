// Shared helpers for the compatibility tests: a debug-mode sandbox, scratch
// directories, polling, and (for secured.test.mjs) a private envd.
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

/**
 * debugSandbox is `Sandbox.create()` in the SDK's debug mode: no API call,
 * envd at http://localhost:49983 (started by run.sh), no access token.
 */
export async function debugSandbox() {
  if ((process.env.E2B_DEBUG ?? '').toLowerCase() !== 'true') {
    throw new Error('E2B_DEBUG=true is required: run the tests through ./run.sh')
  }
  const sandbox = await Sandbox.create()
  if (sandbox.sandboxId !== 'debug_sandbox_id') {
    throw new Error(`expected the SDK's debug sandbox, got ${sandbox.sandboxId}`)
  }
  return sandbox
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
