// Template builds with the npm SDK (TEMPLATES.md §1): Template.build from
// fromTemplate('base') with COPY, RUN, ENV, WORKDIR, USER and a start
// command with waitForPort; what sandboxes of the template see; a rebuild of
// the unchanged template from the cache; a failing RUN step as BuildError.
import assert from 'node:assert/strict'
import { after, before, describe, it } from 'node:test'
import { BuildError, Sandbox, Template, waitForPort } from 'e2b'
import { uniqueName } from '../helpers.mjs'
import { BUILD_TIMEOUT_MS, describeRun, expectSandbox, makeContext, warren } from './lib.mjs'

const opts = { timeout: BUILD_TIMEOUT_MS }
const sandboxes = []
const names = []

after(async () => {
  for (const sb of sandboxes) await Sandbox.kill(sb.sandboxId).catch(() => {})
  // The templates would stay in the compat data dir: delete them.
  for (const name of names) {
    const r = await warren(['template', 'rm', name])
    assert.equal(r.code, 0, `warren template rm ${name}: ${describeRun(r)}`)
  }
})

// web is the template under test. fileContextPath is the COPY context.
function web(contextDir) {
  return Template({ fileContextPath: contextDir })
    .fromTemplate('base')
    .setUser('root')
    .copy('app', '/home/user/app', { user: 'user' })
    .runCmd('echo built-by-run > /opt/run-marker.txt')
    .setEnvs({ GREETING: 'hello from env', SPACED: 'two  spaces' })
    .setWorkdir('/home/user/app')
    .setUser('user')
    .setStartCmd('python3 -m http.server 8000', waitForPort(8000))
}

describe('Template.build from base', opts, () => {
  let context
  let name
  let firstMs
  let logs = []

  before(async () => {
    name = uniqueName('compat-sdk')
    names.push(name)
    context = makeContext('compat-sdk', {
      'app/index.txt': 'served from the template',
      'app/nested/deep.txt': 'deep file',
      // Unique to this run, so that the first build is one: the compat
      // data dir keeps its base build and build cache across runs, and an
      // earlier run's steps would otherwise all be cached.
      'app/run.txt': name,
    })
    const started = Date.now()
    const info = await Template.build(web(context.dir), name, {
      cpuCount: 2,
      memoryMB: 1024,
      onBuildLogs: (e) => logs.push(e),
    })
    firstMs = Date.now() - started
    assert.ok(info.templateId, 'templateId')
    assert.ok(info.buildId, 'buildId')
  })

  after(() => context?.remove())

  it('reports the build through onBuildLogs', () => {
    const text = logs.map(String).join('\n')
    assert.match(text, /Template created with ID: \w+, Build ID: [\w-]+/)
    assert.ok(logs.length > 3, `only ${logs.length} log entries:\n${text}`)
  })

  it('gives sandboxes the files, env, user, workdir and running start command', opts, async () => {
    const sandbox = await expectSandbox(name, {
      files: {
        '/home/user/app/index.txt': 'served from the template',
        'nested/deep.txt': 'deep file', // relative to the workdir
        '/opt/run-marker.txt': 'built-by-run',
      },
      env: { GREETING: 'hello from env', SPACED: 'two  spaces' },
      user: 'user',
      workdir: '/home/user/app',
      process: 'python3 -m http.server 8000',
      processUser: 'user',
      http: { port: 8000, path: '/index.txt', body: 'served from the template' },
    })
    sandboxes.push(sandbox)
    // COPY's user option owns the files; RUN ran as root.
    const owners = await sandbox.commands.run('stat -c %U /home/user/app/index.txt /opt/run-marker.txt')
    assert.deepEqual(owners.stdout.trim().split('\n'), ['user', 'root'])
  })

  it('rebuilds the unchanged template from the cache in under 20% of the first build', opts, async () => {
    const again = []
    const started = Date.now()
    await Template.build(web(context.dir), name, { cpuCount: 2, memoryMB: 1024, onBuildLogs: (e) => again.push(e) })
    const ms = Date.now() - started
    const text = again.map(String).join('\n')
    assert.match(text, /Skipping upload of 'app', already cached/)
    assert.ok(ms < firstMs * 0.2, `rebuild took ${ms} ms, the first build ${firstMs} ms:\n${text}`)
    // The rebuilt template still works.
    sandboxes.push(await expectSandbox(name, { files: { 'index.txt': 'served from the template' }, process: 'python3 -m http.server 8000' }))
  })

  it('is listed by Template.exists', async () => {
    assert.equal(await Template.exists(name), true)
    assert.equal(await Template.exists(uniqueName('compat-missing')), false)
  })
})

describe('a failing RUN step', opts, () => {
  it('throws BuildError pointing at the failing step', opts, async () => {
    const logs = []
    // Step 1 RUN succeeds, step 2 fails: the SDK maps reason.step "2" to the
    // stack trace of the runCmd call that made step 2 (this line).
    const failLine = Number(new Error().stack.split('\n')[1].match(/:(\d+):\d+\)?$/)[1]) + 1
    const template = Template().fromTemplate('base').runCmd('echo fine').runCmd('echo doomed-step >&2; exit 3')
    let err
    try {
      const failName = uniqueName('compat-fail')
      names.push(failName)
      await Template.build(template, failName, { onBuildLogs: (e) => logs.push(e) })
    } catch (e) {
      err = e
    }
    const text = logs.map(String).join('\n')
    assert.ok(err instanceof BuildError, `got ${err?.constructor?.name}: ${err?.message}\n${text}`)
    assert.ok(err.message.length > 0, 'BuildError without a message')
    assert.match(err.message, /3|doomed-step/, `the message says nothing about the failure: ${err.message}`)
    assert.ok(err.stack.includes(`sdk.test.mjs:${failLine}:`), `the stack does not point at line ${failLine}:\n${err.stack}`)
    assert.ok(logs.some((e) => e.level === 'error'), `no error log entry:\n${text}`)
  })
})
