// Shared code of the template end-to-end tests (templates/*.test.mjs, api
// stage): build contexts, running the CLIs (bin/warren, the npm @e2b/cli),
// and checking what a sandbox of a built template sees.
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Sandbox } from 'e2b'
import { proxyFetch } from '../helpers.mjs'

/** Paths of the two CLIs. */
export const WARREN_BIN = fileURLToPath(new URL('../../../bin/warren', import.meta.url))
export const E2B_CLI = fileURLToPath(new URL('../node_modules/@e2b/cli/dist/index.js', import.meta.url))

/** A build under TCG boots a VM per build: minutes, not seconds. */
export const BUILD_TIMEOUT_MS = 20 * 60_000

/**
 * makeContext writes a build context into a new temporary directory:
 * `files` maps relative paths to contents. Returns { dir, remove }.
 */
export function makeContext(prefix, files) {
  const dir = mkdtempSync(join(tmpdir(), `${prefix}-`))
  for (const [rel, content] of Object.entries(files)) {
    mkdirSync(dirname(join(dir, rel)), { recursive: true })
    writeFileSync(join(dir, rel), content)
  }
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) }
}

/**
 * run starts a program and collects its output; it resolves (never rejects)
 * with { code, stdout, stderr, ms }. The child gets this process's
 * environment (E2B_API_URL, E2B_API_KEY from run.sh) plus `env`, never asks
 * the npm registry for updates, and has a scratch HOME (no ~/.e2b config).
 */
export function run(cmd, args, { cwd, env = {}, timeoutMs = BUILD_TIMEOUT_MS } = {}) {
  const home = mkdtempSync(join(tmpdir(), 'compat-home-'))
  const started = Date.now()
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      cwd,
      env: { ...process.env, NO_UPDATE_NOTIFIER: '1', HOME: home, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    })
    let stdout = ''
    let stderr = ''
    child.stdout.on('data', (d) => { stdout += d })
    child.stderr.on('data', (d) => { stderr += d })
    const timer = setTimeout(() => child.kill('SIGTERM'), timeoutMs)
    child.on('error', reject)
    child.on('close', (code, signal) => {
      clearTimeout(timer)
      rmSync(home, { recursive: true, force: true })
      resolve({ code: code ?? signal, stdout, stderr, ms: Date.now() - started })
    })
  })
}

/** describeRun is a process result for assertion messages. */
export function describeRun(r) {
  return `exit ${r.code} after ${r.ms} ms\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`
}

/** warren runs bin/warren with args. */
export function warren(args, opts) {
  return run(WARREN_BIN, args, opts)
}

/**
 * sh runs a command in the sandbox (as `user` unless opts.user) and returns
 * its trimmed stdout.
 */
export async function sh(sandbox, cmd, opts = {}) {
  const r = await sandbox.commands.run(cmd, { timeoutMs: 30_000, ...opts })
  return r.stdout.trim()
}

/**
 * expectSandbox creates a sandbox of template `name` and checks what the
 * build promised: `files` (path → content), `env` (name → value),
 * `user`, `workdir`, the start command `process` running as `processUser`,
 * and `http` ({ port, path, body }) answering through warren's proxy.
 * Returns the sandbox (the caller kills it).
 */
export async function expectSandbox(name, want) {
  const sandbox = await Sandbox.create(name, { timeoutMs: 10 * 60_000, metadata: { compat: 'templates' } })
  try {
    for (const [path, content] of Object.entries(want.files ?? {})) {
      assert.equal(await sh(sandbox, `cat ${path}`), content, `content of ${path}`)
    }
    for (const [key, value] of Object.entries(want.env ?? {})) {
      assert.equal(await sh(sandbox, `printf %s "$${key}"`), value, `$${key} in a command`)
    }
    if (want.user) assert.equal(await sh(sandbox, 'whoami'), want.user, 'default user')
    if (want.workdir) assert.equal(await sh(sandbox, 'pwd'), want.workdir, 'default workdir')
    if (want.process) {
      // The start command runs from the snapshot on: no wait here.
      const ps = await sh(sandbox, 'ps -eo user:32=,args=', { user: 'root' })
      const line = ps.split('\n').find((l) => l.includes(want.process))
      assert.ok(line, `start command "${want.process}" not running:\n${ps}`)
      if (want.processUser) assert.equal(line.trim().split(/\s+/)[0], want.processUser, `user of "${want.process}"`)
    }
    if (want.http) {
      const res = await proxyFetch(sandbox.sandboxId, want.http.port, want.http.path)
      assert.equal(res.status, 200, `GET ${want.http.path} on port ${want.http.port}`)
      assert.equal(await res.text(), want.http.body)
    }
  } catch (err) {
    await sandbox.kill().catch(() => {})
    throw err
  }
  return sandbox
}

/**
 * ociArchive returns a bootable OCI image archive (OCI layout tar) for the
 * `warren template build` FROM-an-imported-image test, or undefined.
 * The image must boot as a template base: a Debian-family root with
 * python3 and procps (warren provisions envd, `user` and sudo into it), and
 * the file /etc/compat-image.txt with the content "from the imported image".
 *
 * run.sh makes it (test/compat/mkimage, from the base template's root image)
 * and exports its path in WARREN_COMPAT_OCI_ARCHIVE when the stage runs
 * oci.test.mjs.
 */
export function ociArchive() {
  return process.env.WARREN_COMPAT_OCI_ARCHIVE || undefined
}

/**
 * dataDir is the data dir of the warren under test: run.sh's WARREN_DATA
 * (lib.sh exports it as WARREN_COMPAT_DATA_DIR), never the Go tests' cache.
 */
export function dataDir() {
  const dir = process.env.WARREN_COMPAT_DATA_DIR
  assert.ok(dir, 'WARREN_COMPAT_DATA_DIR is not set: run the tests through run.sh')
  return dir
}

/**
 * importImage imports an OCI archive into the store of the warren under
 * test (its data dir) as `name`.
 */
export async function importImage(name, archive) {
  const r = await warren(['image', 'import', '--data-dir', dataDir(), name, archive])
  assert.equal(r.code, 0, `warren image import: ${describeRun(r)}`)
}
