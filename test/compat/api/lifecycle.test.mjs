// The sandbox lifecycle through warren's E2B API (README mode A): create,
// connect, getInfo, list with metadata filters and paging, metrics,
// setTimeout and expiry, kill.
import assert from 'node:assert/strict'
import { after, before, describe, it } from 'node:test'
import { AuthenticationError, NotFoundError, Sandbox, SandboxNotFoundError } from 'e2b'
import { HOME, rejection, uniqueName, waitFor } from '../helpers.mjs'

const opts = { timeout: 60_000 }
// Every sandbox of this file carries this run's tag, so list results of other
// files and earlier runs cannot interfere.
const run = uniqueName('lifecycle')
const created = []

let sandbox
let createdAt
let createMs
let firstCommand

// create makes a sandbox tagged with this run and remembers it for cleanup.
async function create(extra = {}) {
  const sb = await Sandbox.create({
    timeoutMs: 10 * 60_000,
    ...extra,
    metadata: { compat: 'lifecycle', run, ...extra.metadata },
  })
  created.push(sb)
  return sb
}

before(async () => {
  createdAt = new Date()
  sandbox = await create({ metadata: { role: 'main' } })
  createMs = Date.now() - createdAt.getTime()
  // The first command, right after create answered: 201 means usable now.
  const started = Date.now()
  firstCommand = await sandbox.commands.run('echo ready; cat /proc/uptime').then(
    (result) => ({ result, ms: Date.now() - started }),
    (error) => ({ error, ms: Date.now() - started }),
  )
})

after(async () => {
  for (const sb of created) await Sandbox.kill(sb.sandboxId).catch(() => {})
})

describe('Sandbox.create', opts, () => {
  it('returns a sandbox that runs a command at once', () => {
    assert.equal(firstCommand.error, undefined, `first command failed after ${firstCommand.ms} ms: ${firstCommand.error}`)
    assert.match(firstCommand.result.stdout, /^ready\n/)
    console.log(`create took ${createMs} ms, the first command ${firstCommand.ms} ms`)
  })

  it('names the sandbox with a DNS-label-safe ID and hands out an envd access token', () => {
    assert.match(sandbox.sandboxId, /^[a-z0-9]+$/)
    assert.equal(typeof sandbox.envdAccessToken, 'string')
    assert.ok(sandbox.envdAccessToken.length >= 16, 'envdAccessToken too short')
  })

  it('sets E2B_SANDBOX_ID and E2B_TEMPLATE_ID for every process', async () => {
    const { stdout } = await sandbox.commands.run('echo "$E2B_SANDBOX $E2B_SANDBOX_ID $E2B_TEMPLATE_ID"')
    const info = await sandbox.getInfo()
    assert.equal(stdout, `true ${sandbox.sandboxId} ${info.templateId}\n`)
  })

  it('gives each sandbox its own ID, filesystem and create-time envs', async () => {
    const value = uniqueName('env')
    const other = await create({ envs: { COMPAT_CREATE_ENV: value } })
    assert.notEqual(other.sandboxId, sandbox.sandboxId)
    const path = `${HOME}/${uniqueName('only-here')}.txt`
    await sandbox.files.write(path, 'x')
    assert.equal(await other.files.exists(path), false)
    assert.equal((await other.commands.run('echo "$COMPAT_CREATE_ENV"')).stdout, `${value}\n`)
    assert.equal((await other.commands.run('echo "$COMPAT_CREATE_ENV"', { user: 'root' })).stdout, `${value}\n`)
    assert.equal((await sandbox.commands.run('echo "[${COMPAT_CREATE_ENV-unset}]"')).stdout, '[unset]\n')
    assert.equal(await Sandbox.kill(other.sandboxId), true)
  })

  it('rejects an unknown template with a 404 error', async () => {
    const err = await rejection(Sandbox.create(uniqueName('no-such-template'), { timeoutMs: 30_000 }))
    assert.ok(err instanceof NotFoundError || err?.statusCode === 404, `got ${err?.constructor?.name}: ${err?.message}`)
  })

  it('refuses a wrong API key with AuthenticationError', async () => {
    const err = await rejection(Sandbox.create({ apiKey: 'e2b_' + '0'.repeat(40), timeoutMs: 30_000 }))
    assert.ok(err instanceof AuthenticationError, `got ${err?.constructor?.name}: ${err?.message}`)
  })
})

describe('Sandbox.connect', opts, () => {
  it('returns a handle on the same running sandbox', async () => {
    const path = `${HOME}/${uniqueName('connect')}.txt`
    await sandbox.files.write(path, 'written before connect')
    const again = await Sandbox.connect(sandbox.sandboxId)
    assert.equal(again.sandboxId, sandbox.sandboxId)
    assert.equal(again.envdAccessToken, sandbox.envdAccessToken)
    assert.equal(await again.files.read(path), 'written before connect')
    assert.equal((await again.commands.run('echo via-connect')).stdout, 'via-connect\n')
  })

  it('of an unknown ID throws SandboxNotFoundError', async () => {
    const err = await rejection(Sandbox.connect('inosuchsandbox000000'))
    assert.ok(err instanceof SandboxNotFoundError, `got ${err?.constructor?.name}: ${err?.message}`)
  })
})

describe('getInfo', opts, () => {
  it('describes the running sandbox', async () => {
    const info = await sandbox.getInfo()
    assert.equal(info.sandboxId, sandbox.sandboxId)
    assert.equal(info.state, 'running')
    assert.match(info.templateId, /^[a-z0-9]+$/)
    assert.ok(info.templateId === 'base' || info.name === 'base', `templateId ${info.templateId}, name ${info.name}`)
    assert.deepEqual(info.metadata, { compat: 'lifecycle', run, role: 'main' })
    assert.ok(info.startedAt instanceof Date && !Number.isNaN(info.startedAt.getTime()), `startedAt ${info.startedAt}`)
    // startedAt within the create call (server clock = this host's clock; 1 s of rounding)
    assert.ok(info.startedAt.getTime() >= createdAt.getTime() - 1000, `startedAt ${info.startedAt.toISOString()} before create ${createdAt.toISOString()}`)
    assert.ok(info.startedAt.getTime() <= Date.now(), `startedAt ${info.startedAt.toISOString()} in the future`)
    // endAt = startedAt + the requested 10 min
    const lifetime = info.endAt.getTime() - info.startedAt.getTime()
    assert.ok(Math.abs(lifetime - 10 * 60_000) < 5000, `endAt - startedAt = ${lifetime} ms, want 600000`)
    assert.ok(info.cpuCount >= 1, `cpuCount ${info.cpuCount}`)
    assert.ok(info.memoryMB >= 128, `memoryMB ${info.memoryMB}`)
    assert.match(info.envdVersion ?? '', /^\d+\.\d+\.\d+/)
  })

  it('of an unknown ID throws SandboxNotFoundError', async () => {
    const err = await rejection(Sandbox.getInfo('inosuchsandbox000000'))
    assert.ok(err instanceof SandboxNotFoundError, `got ${err?.constructor?.name}: ${err?.message}`)
  })
})

describe('Sandbox.list', opts, () => {
  let listed // the running sandboxes of this run, oldest first

  before(async () => {
    listed = [sandbox]
    for (let i = 0; i < 2; i++) listed.push(await create({ metadata: { role: `extra-${i}` } }))
  })

  it('filters by metadata', async () => {
    const items = await Sandbox.list({ query: { metadata: { run, role: 'main' } } }).nextItems()
    assert.deepEqual(items.map((s) => s.sandboxId), [sandbox.sandboxId])
    const item = items[0]
    assert.equal(item.state, 'running')
    assert.deepEqual(item.metadata, { compat: 'lifecycle', run, role: 'main' })
    assert.ok(item.startedAt instanceof Date && item.endAt > item.startedAt)
  })

  it('returns nothing for metadata no sandbox has', async () => {
    const paginator = Sandbox.list({ query: { metadata: { run, role: 'nobody' } } })
    assert.deepEqual(await paginator.nextItems(), [])
    assert.equal(paginator.hasNext, false)
  })

  it('pages with limit and nextItems, newest first, each sandbox once', async () => {
    const paginator = Sandbox.list({ query: { metadata: { run } }, limit: 2 })
    const first = await paginator.nextItems()
    assert.equal(first.length, 2)
    assert.equal(paginator.hasNext, true, 'a third sandbox is left')
    const second = await paginator.nextItems()
    assert.equal(second.length, 1)
    assert.equal(paginator.hasNext, false)
    const ids = [...first, ...second].map((s) => s.sandboxId)
    // Killed sandboxes of this file (the one of 'own filesystem') are gone.
    assert.deepEqual(ids, listed.map((s) => s.sandboxId).reverse())
    const started = [...first, ...second].map((s) => s.startedAt.getTime())
    assert.deepEqual(started, [...started].sort((a, b) => b - a), 'newest first')
  })

  it('matches every metadata pair, not any', async () => {
    const items = await Sandbox.list({ query: { metadata: { run, role: 'extra-1' } } }).nextItems()
    assert.deepEqual(items.map((s) => s.sandboxId), [listed[2].sandboxId])
  })

  it('no longer lists a killed sandbox', async () => {
    const victim = listed.pop()
    assert.equal(await victim.kill(), true)
    const ids = (await Sandbox.list({ query: { metadata: { run } } }).nextItems()).map((s) => s.sandboxId)
    assert.ok(!ids.includes(victim.sandboxId), `killed ${victim.sandboxId} still listed: ${ids}`)
    assert.equal(ids.length, listed.length)
  })
})

describe('getMetrics', opts, () => {
  it('returns samples shortly after create', async () => {
    const metrics = await waitFor('a non-empty getMetrics()', async () => {
      const m = await sandbox.getMetrics()
      return m.length > 0 && m
    }, 20_000, 1000)
    const m = metrics.at(-1)
    assert.ok(m.timestamp instanceof Date && !Number.isNaN(m.timestamp.getTime()), `timestamp ${m.timestamp}`)
    assert.ok(Math.abs(m.timestamp.getTime() - Date.now()) < 120_000, `timestamp ${m.timestamp.toISOString()}`)
    assert.ok(m.cpuCount >= 1, `cpuCount ${m.cpuCount}`)
    assert.ok(m.cpuUsedPct >= 0, `cpuUsedPct ${m.cpuUsedPct}`)
    assert.ok(m.memTotal > 0 && m.memUsed > 0 && m.memUsed <= m.memTotal, `mem ${m.memUsed}/${m.memTotal}`)
    assert.ok(m.diskTotal > 0 && m.diskUsed > 0 && m.diskUsed <= m.diskTotal, `disk ${m.diskUsed}/${m.diskTotal}`)
  })

  it('of an unknown ID throws SandboxNotFoundError', async () => {
    const err = await rejection(Sandbox.getMetrics('inosuchsandbox000000'))
    assert.ok(err instanceof SandboxNotFoundError, `got ${err?.constructor?.name}: ${err?.message}`)
  })
})

describe('setTimeout', opts, () => {
  it('moves endAt, also earlier, and the sandbox is gone soon after it', async () => {
    const sb = await create({ metadata: { role: 'expiring' } })
    const before = await sb.getInfo()
    await sb.setTimeout(4000)
    const set = Date.now()
    const info = await sb.getInfo()
    assert.ok(info.endAt < before.endAt, `endAt ${info.endAt.toISOString()} not earlier than ${before.endAt.toISOString()}`)
    assert.ok(Math.abs(info.endAt.getTime() - (set + 4000)) < 2000, `endAt ${info.endAt.toISOString()}, want now+4s`)
    assert.equal(await sb.isRunning(), true)

    await waitFor('isRunning() false after the timeout', async () => !(await sb.isRunning()), 10_000, 250)
    const gone = Date.now() - set
    assert.ok(gone >= 3000, `envd gone ${gone} ms after setTimeout(4000)`)
    // The proxy stops at endAt; the API forgets the sandbox when its evictor
    // has killed it, a moment later.
    const err = await waitFor('getInfo to throw NotFoundError after the timeout', async () => {
      const e = await rejection(sb.getInfo()).catch(() => null)
      return e instanceof NotFoundError && e
    }, 3000, 100)
    assert.ok(err instanceof SandboxNotFoundError, `getInfo after expiry: ${err?.constructor?.name}: ${err?.message}`)
    const forgotten = Date.now() - set
    assert.equal(await sb.kill(), false)
    console.log(`setTimeout(4000): envd gone after ${gone} ms, getInfo 404 after ${forgotten} ms`)
  })

  it('of an unknown ID throws SandboxNotFoundError', async () => {
    const err = await rejection(Sandbox.setTimeout('inosuchsandbox000000', 10_000))
    assert.ok(err instanceof SandboxNotFoundError, `got ${err?.constructor?.name}: ${err?.message}`)
  })
})

describe('kill', opts, () => {
  it('is true once, then false; the sandbox is gone everywhere', async () => {
    const id = sandbox.sandboxId
    assert.equal(await sandbox.kill(), true)
    assert.equal(await sandbox.kill(), false)
    assert.equal(await Sandbox.kill(id), false)
    assert.equal(await sandbox.isRunning(), false)
    const err = await rejection(sandbox.getInfo())
    assert.ok(err instanceof SandboxNotFoundError, `getInfo after kill: ${err?.constructor?.name}: ${err?.message}`)
    const ids = (await Sandbox.list({ query: { metadata: { run } } }).nextItems()).map((s) => s.sandboxId)
    assert.ok(!ids.includes(id), `killed ${id} still listed`)
    const run2 = await rejection(sandbox.commands.run('true', { requestTimeoutMs: 10_000 }))
    assert.ok(run2 instanceof Error, `commands.run after kill: ${run2}`)
  })

  it('of an unknown ID is false', async () => {
    assert.equal(await Sandbox.kill('inosuchsandbox000000'), false)
  })
})
