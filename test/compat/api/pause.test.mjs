// Pause, resume, snapshots and forks through warren's E2B API with real VMs
// (README mode A): pause → getInfo().state == 'paused' → isRunning() false →
// connect, with files, memory (/dev/shm) and a running process kept, twice;
// a disk-only pause; auto-pause at the deadline; auto-resume by traffic to a
// <port>-<id> host; a snapshot started as a template; three forks; and a
// restart of warren (run.sh's api stage restarts it on SIGUSR1), which a
// paused sandbox outlives, which pauses a running one with autoPause and
// kills the others. The restart tests run last.
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { request } from 'node:http'
import { after, before, describe, it } from 'node:test'
import { Sandbox, SandboxNotFoundError } from 'e2b'
import { HOME, proxyFetch, rejection, sandboxUrl, startHttpServer, uniqueName, waitFor } from '../helpers.mjs'

// Saving and restoring memory under TCG takes a while.
const opts = { timeout: 10 * 60_000 }
const run = uniqueName('pause')
const created = []
const snapshots = []

// create makes a sandbox (from template, default base) tagged with this run
// and remembers it for cleanup.
async function create(extra = {}, template = 'base') {
  const sb = await Sandbox.create(template, {
    timeoutMs: 15 * 60_000,
    ...extra,
    metadata: { compat: 'pause', run, ...extra.metadata },
  })
  created.push(sb.sandboxId)
  return sb
}

after(async () => {
  for (const id of created) await Sandbox.kill(id).catch(() => {})
  for (const id of snapshots) await Sandbox.deleteSnapshot(id).catch(() => {})
})

// markState leaves a file on disk, a value in memory only (/dev/shm is a
// tmpfs) and a sleeping process, and returns how to check them.
async function markState(sb) {
  const path = `${HOME}/${uniqueName('disk')}.txt`
  const shm = `/dev/shm/${uniqueName('mem')}`
  const value = uniqueName('value')
  await sb.files.write(path, value)
  await sb.commands.run(`echo ${value} > ${shm}`)
  const sleeper = await sb.commands.run('sleep 3600', { background: true, timeoutMs: 0 })
  return { path, shm, value, pid: sleeper.pid }
}

async function hasFile(sb, s) {
  return (await sb.files.read(s.path)) === s.value
}

async function hasMemory(sb, s) {
  const { stdout } = await sb.commands.run(`cat ${s.shm} 2>/dev/null || true`)
  return stdout === `${s.value}\n`
}

async function hasProcess(sb, s) {
  const list = await sb.commands.list()
  return list.some((p) => p.pid === s.pid)
}

describe('pause and connect', opts, () => {
  it('keeps files, memory and a running process, two cycles in a row', async () => {
    const sb = await create()
    const state = await markState(sb)
    for (const cycle of [1, 2]) {
      assert.equal(await sb.pause(), true, `cycle ${cycle}: pause`)
      assert.equal((await sb.getInfo()).state, 'paused', `cycle ${cycle}: state`)
      assert.equal(await sb.isRunning(), false, `cycle ${cycle}: isRunning`)
      assert.equal(await sb.pause(), false, `cycle ${cycle}: a second pause reports "already paused"`)
      const listed = await Sandbox.list({ query: { metadata: { run }, state: ['paused'] } }).nextItems()
      assert.ok(listed.some((s) => s.sandboxId === sb.sandboxId), `cycle ${cycle}: not listed as paused`)

      const again = await Sandbox.connect(sb.sandboxId, { timeoutMs: 15 * 60_000 })
      assert.equal(again.sandboxId, sb.sandboxId)
      assert.equal(again.envdAccessToken, sb.envdAccessToken)
      assert.equal((await again.getInfo()).state, 'running')
      assert.equal(await again.isRunning(), true)
      assert.ok(await hasFile(again, state), `cycle ${cycle}: file lost`)
      assert.ok(await hasMemory(again, state), `cycle ${cycle}: memory (/dev/shm) lost`)
      assert.ok(await hasProcess(again, state), `cycle ${cycle}: sleep ${state.pid} is gone`)
      assert.equal((await again.commands.run('echo "$E2B_SANDBOX_ID"')).stdout, `${sb.sandboxId}\n`)
    }
  })

  it('a disk-only pause keeps files; connect cold boots it', async () => {
    const sb = await create()
    const state = await markState(sb)
    assert.equal(await sb.pause({ keepMemory: false }), true)
    assert.equal((await sb.getInfo()).state, 'paused')
    const again = await Sandbox.connect(sb.sandboxId)
    assert.ok(await hasFile(again, state), 'file lost')
    assert.equal(await hasMemory(again, state), false, '/dev/shm survived a cold boot')
    assert.equal(await hasProcess(again, state), false, 'a process survived a cold boot')
  })

  it('auto-pauses at the deadline (onTimeout: pause) and connect resumes it', async () => {
    const sb = await create({ timeoutMs: 20_000, lifecycle: { onTimeout: 'pause' } })
    const info = await sb.getInfo()
    assert.equal(info.lifecycle?.onTimeout, 'pause')
    const state = await markState(sb)
    await waitFor('the sandbox to pause at its deadline', async () => (await sb.getInfo()).state === 'paused', 5 * 60_000, 500)
    assert.equal(await sb.isRunning(), false)
    const again = await Sandbox.connect(sb.sandboxId, { timeoutMs: 10 * 60_000 })
    assert.ok(await hasFile(again, state), 'file lost')
    assert.ok(await hasMemory(again, state), 'memory lost')
  })
})

// hostGet is GET / with Host: <port>-<id>.warren.test on warren's single
// origin: host routing, which works on any domain in mode A.
function hostGet(port, id) {
  const url = new URL(sandboxUrl)
  return new Promise((resolve, reject) => {
    const req = request(
      { host: url.hostname, port: url.port, path: '/', headers: { Host: `${port}-${id}.warren.test` } },
      (res) => {
        let body = ''
        res.setEncoding('utf8')
        res.on('data', (chunk) => (body += chunk))
        res.on('end', () => resolve({ status: res.statusCode, body }))
      },
    )
    req.on('error', reject)
    req.end()
  })
}

describe('auto-resume', opts, () => {
  it('traffic to a <port>-<id> host resumes the sandbox and reaches its server', async () => {
    const sb = await create({ lifecycle: { onTimeout: 'pause', autoResume: true } })
    assert.equal((await sb.getInfo()).lifecycle?.autoResume, true)
    const port = 8000
    const { marker } = await startHttpServer(sb, port)
    await waitFor(`the server on ${port}`, async () => (await proxyFetch(sb.sandboxId, port).catch(() => null))?.status === 200, 30_000, 200)
    assert.equal(await sb.pause(), true)
    assert.equal((await sb.getInfo()).state, 'paused')

    const res = await hostGet(port, sb.sandboxId)
    assert.equal(res.status, 200, res.body)
    assert.equal(res.body, marker)
    assert.equal((await sb.getInfo()).state, 'running')
  })

  it('without autoResume a paused sandbox answers 502 and stays paused', async () => {
    const sb = await create()
    assert.equal(await sb.pause(), true)
    const res = await proxyFetch(sb.sandboxId, 49983, '/health', { headers: { 'X-Access-Token': sb.envdAccessToken } })
    assert.equal(res.status, 502)
    assert.equal((await res.json()).message, 'The sandbox was not found')
    assert.equal((await sb.getInfo()).state, 'paused')
  })
})

describe('snapshots and forks', opts, () => {
  it('a snapshot starts new sandboxes with the source state; the source keeps running', async () => {
    const sb = await create()
    const path = `${HOME}/${uniqueName('snap')}.txt`
    await sb.files.write(path, 'from the source')
    const name = uniqueName('snap')
    const snap = await sb.createSnapshot({ name })
    snapshots.push(snap.snapshotId)
    assert.ok(snap.names.some((n) => n.includes(name)), `names ${snap.names}`)
    assert.equal((await sb.getInfo()).state, 'running')
    assert.equal((await sb.commands.run('echo still-here')).stdout, 'still-here\n')

    const listed = await sb.listSnapshots().nextItems()
    assert.ok(listed.some((s) => s.snapshotId === snap.snapshotId), `listed ${JSON.stringify(listed)}`)

    for (const ref of [snap.snapshotId, name]) {
      const copy = await create({}, ref)
      assert.equal(await copy.files.read(path), 'from the source')
      await copy.files.write(path, 'changed in the copy')
      assert.equal(await sb.files.read(path), 'from the source')
      await copy.kill()
    }
    assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), true)
    assert.equal(await Sandbox.deleteSnapshot(snap.snapshotId), false)
  })

  it('fork makes three running copies; the source keeps its ID and deadline', async () => {
    const sb = await create()
    const path = `${HOME}/${uniqueName('fork')}.txt`
    await sb.files.write(path, 'before fork')
    const endAt = (await sb.getInfo()).endAt.getTime()
    const forks = await sb.fork({ count: 3, timeoutMs: 5 * 60_000 })
    assert.equal(forks.length, 3)
    const ids = new Set([sb.sandboxId])
    for (const fork of forks) {
      assert.ok(fork instanceof Sandbox, `fork failed: ${fork}`)
      created.push(fork.sandboxId)
      ids.add(fork.sandboxId)
      assert.equal(await fork.files.read(path), 'before fork')
      assert.equal((await fork.commands.run('echo "$E2B_SANDBOX_ID"')).stdout, `${fork.sandboxId}\n`)
    }
    assert.equal(ids.size, 4, 'fork IDs are not distinct')
    await forks[0].files.write(path, 'changed in a fork')
    assert.equal(await sb.files.read(path), 'before fork')
    const info = await sb.getInfo()
    assert.equal(info.state, 'running')
    assert.equal(info.endAt.getTime(), endAt)
  })
})

// restartWarren asks run.sh's api stage to restart warren (SIGUSR1 to the
// stage) and waits until the new process answers.
async function restartWarren() {
  const pidFile = process.env.WARREN_COMPAT_PID_FILE
  const stage = Number(process.env.WARREN_COMPAT_STAGE_PID)
  const pid = () => {
    try {
      return readFileSync(pidFile, 'utf8').trim()
    } catch {
      return ''
    }
  }
  const before = pid()
  process.kill(stage, 'SIGUSR1')
  await waitFor('warren to restart', async () => {
    const now = pid()
    if (now === '' || now === before) return false
    const res = await fetch(new URL('/health', sandboxUrl)).catch(() => null)
    return res?.status === 200
  }, 5 * 60_000, 500)
}

const canRestart = process.env.WARREN_COMPAT_PID_FILE && process.env.WARREN_COMPAT_STAGE_PID

// One restart for all three: a paused sandbox, a running one with autoPause
// (SIGTERM pauses it) and a running one without (SIGTERM kills it).
describe('warren restart', { ...opts, skip: !canRestart && 'needs ./run.sh api' }, () => {
  const sandboxes = {}
  before(async () => {
    for (const [name, extra] of [['paused', {}], ['autoPaused', { lifecycle: { onTimeout: 'pause' } }], ['plain', {}]]) {
      const sb = await create(extra)
      sandboxes[name] = { sb, state: name === 'plain' ? null : await markState(sb) }
    }
    assert.equal(await sandboxes.paused.sb.pause(), true)
    await restartWarren()
  })

  for (const [name, what] of [['paused', 'a paused sandbox survives it'], ['autoPaused', 'a running sandbox with autoPause is paused by it']]) {
    it(`${what} with its files, memory and processes`, async () => {
      const { sb, state } = sandboxes[name]
      assert.equal((await Sandbox.getInfo(sb.sandboxId)).state, 'paused')
      const again = await Sandbox.connect(sb.sandboxId)
      assert.ok(await hasFile(again, state), 'file lost')
      assert.ok(await hasMemory(again, state), 'memory lost')
      assert.ok(await hasProcess(again, state), 'process lost')
    })
  }

  it('a running sandbox without autoPause is killed by it', async () => {
    const err = await rejection(Sandbox.getInfo(sandboxes.plain.sb.sandboxId))
    assert.ok(err instanceof SandboxNotFoundError, `got ${err?.constructor?.name}: ${err?.message}`)
  })
})
