// Template builds from a Dockerfile with the two CLIs (TEMPLATES.md §2):
// the npm `e2b template create` (@e2b/cli, pinned) from `FROM e2bdev/base`,
// then `warren template build` of the same context (its COPY hash must be
// the SDK's: the upload is skipped), `warren template ls` and `rm`.
import assert from 'node:assert/strict'
import { after, before, describe, it } from 'node:test'
import { NotFoundError, Sandbox } from 'e2b'
import { rejection, uniqueName } from '../helpers.mjs'
import { BUILD_TIMEOUT_MS, E2B_CLI, describeRun, expectSandbox, makeContext, run, warren } from './lib.mjs'

const opts = { timeout: BUILD_TIMEOUT_MS }
const sandboxes = []

// No USER and no WORKDIR: the E2B defaults (user, /home/user) apply.
const dockerfile = `# syntax=docker/dockerfile:1
FROM e2bdev/base
ENV GREETING=hello-from-the-Dockerfile \\
    MODE=cli
ARG BUILD_ARG=argued
COPY app /home/user/app
RUN mkdir -p /opt/built && \\
    echo "$MODE built" > /opt/built/marker.txt
CMD ["python3", "-m", "http.server", "8000"]
`

const expected = {
  files: { 'app/hello.txt': 'hello from the context', '/opt/built/marker.txt': 'cli built' },
  env: { GREETING: 'hello-from-the-Dockerfile', MODE: 'cli', BUILD_ARG: 'argued' },
  user: 'user',
  workdir: '/home/user',
  process: 'python3 -m http.server 8000',
  processUser: 'user',
  http: { port: 8000, path: '/app/hello.txt', body: 'hello from the context' },
}

let context
before(() => {
  context = makeContext('compat-cli', {
    'e2b.Dockerfile': dockerfile,
    'app/hello.txt': 'hello from the context',
    'app/logs/debug.log': 'ignored by .dockerignore',
    '.dockerignore': '**/*.log\n',
  })
})

after(async () => {
  for (const sb of sandboxes) await Sandbox.kill(sb.sandboxId).catch(() => {})
  context?.remove()
})

describe('e2b template create', opts, () => {
  const name = uniqueName('compat-e2bcli')
  // The template would stay in the compat data dir: delete it.
  after(async () => {
    // Its sandboxes first: a template in use is not deleted (409).
    for (const sb of sandboxes.splice(0)) await Sandbox.kill(sb.sandboxId).catch(() => {})
    const r = await warren(['template', 'rm', name])
    assert.equal(r.code, 0, `warren template rm ${name}: ${describeRun(r)}`)
  })

  it('builds a Dockerfile FROM e2bdev/base', opts, async () => {
    const r = await run(process.execPath, [E2B_CLI, 'template', 'create', name, '--memory-mb', '1024'], { cwd: context.dir })
    assert.equal(r.code, 0, describeRun(r))
    assert.match(r.stdout, /Template created with ID: \w+, Build ID: [\w-]+/, describeRun(r))
  })

  it('gives sandboxes what the Dockerfile says', opts, async () => {
    const sandbox = await expectSandbox(name, expected)
    sandboxes.push(sandbox)
    const ignored = await sandbox.commands.run('test -e /home/user/app/logs/debug.log || echo absent')
    assert.equal(ignored.stdout.trim(), 'absent', '.dockerignore was not applied')
  })
})

describe('warren template build', opts, () => {
  const name = uniqueName('compat-warrencli')
  let build

  before(async () => {
    build = await warren(['template', 'build', '-p', context.dir, '--cpu-count', '2', '--memory-mb', '1024', '--tag', 'v1', name])
  })

  it('builds the same Dockerfile, printing progress and the IDs', () => {
    assert.equal(build.code, 0, describeRun(build))
    assert.match(build.stdout, /step 3\/\d+: ENV GREETING=hello-from-the-Dockerfile MODE=cli/, describeRun(build))
    assert.match(build.stdout, /\[\d+\/\d+\]\s+INFO /, `no step-numbered log lines:\n${build.stdout}`)
    assert.match(build.stdout, new RegExp(`Built template ${name} in .*: template ID \\w+, build ID [\\w-]+`), describeRun(build))
  })

  it('computes the COPY files hash as the SDK does: the server has the files', () => {
    assert.match(build.stdout, /Skipping upload of 'app', already cached/, describeRun(build))
  })

  it('gives sandboxes what the Dockerfile says, also by name:tag', opts, async () => {
    sandboxes.push(await expectSandbox(name, expected))
    sandboxes.push(await expectSandbox(`${name}:v1`, { files: expected.files }))
  })

  it('lists the template with `warren template ls`', async () => {
    const r = await warren(['template', 'ls'])
    assert.equal(r.code, 0, describeRun(r))
    // NAMES holds "namespace/alias" for namespaced templates.
    const named = (l) => (l.split(/\s+/)[1] ?? '').split(',').some((n) => n === name || n.endsWith(`/${name}`))
    const line = r.stdout.split('\n').find(named)
    assert.ok(line, `${name} not listed:\n${r.stdout}`)
    assert.match(line, /\bready\s+2\s+1024 MiB\b/)
  })

  it('fails with the reason and a non-zero exit code when a step fails', opts, async () => {
    const failing = makeContext('compat-cli-fail', { Dockerfile: 'FROM e2bdev/base\nRUN echo ok\nRUN exit 7\n' })
    try {
      const r = await warren(['template', 'build', '-p', failing.dir, uniqueName('compat-warrencli-fail')])
      assert.notEqual(r.code, 0, describeRun(r))
      assert.match(r.stderr, /failed at step 4 \(RUN exit 7\): /, describeRun(r))
    } finally {
      failing.remove()
    }
  })

  it('deletes the template with `warren template rm`', opts, async () => {
    for (const sb of sandboxes.splice(0)) await Sandbox.kill(sb.sandboxId).catch(() => {})
    const r = await warren(['template', 'rm', name])
    assert.equal(r.code, 0, describeRun(r))
    const err = await rejection(Sandbox.create(name, { timeoutMs: 30_000 }))
    assert.ok(err instanceof NotFoundError || err?.statusCode === 404, `got ${err?.constructor?.name}: ${err?.message}`)
    const missing = await warren(['template', 'rm', uniqueName('compat-no-such')])
    assert.notEqual(missing.code, 0, describeRun(missing))
  })
})
