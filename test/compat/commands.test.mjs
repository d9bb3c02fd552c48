// sandbox.commands through the official SDK: Process.Start/Connect/List/
// SendInput/CloseStdin/SendSignal as E2B's JS SDK drives them.
import assert from 'node:assert/strict'
import { after, before, describe, it } from 'node:test'
import { CommandExitError, InvalidArgumentError, TimeoutError } from 'e2b'
import { HOME, rejection, releaseSandbox, testSandbox, uniqueName, waitFor } from './helpers.mjs'

const opts = { timeout: 30_000 }
let sandbox

before(async () => {
  sandbox = await testSandbox('commands')
})

after(async () => {
  await releaseSandbox(sandbox)
})

// processGone reports whether no process has pid any more (kill -0 fails).
async function processGone(pid) {
  try {
    await sandbox.commands.run(`kill -0 ${pid}`, { user: 'root' })
    return false
  } catch (err) {
    if (err instanceof CommandExitError) return true
    throw err
  }
}

describe('commands.run', opts, () => {
  it('returns stdout, stderr and exit code 0', async () => {
    const result = await sandbox.commands.run('echo out; echo err >&2')
    assert.equal(result.exitCode, 0)
    assert.equal(result.stdout, 'out\n')
    assert.equal(result.stderr, 'err\n')
    assert.equal(result.error, undefined)
  })

  it('throws CommandExitError with the exit code and output on a non-zero exit', async () => {
    const err = await rejection(sandbox.commands.run('echo partial; echo bad >&2; exit 3'))
    assert.ok(err instanceof CommandExitError, `got ${err}`)
    assert.equal(err.exitCode, 3)
    assert.equal(err.stdout, 'partial\n')
    assert.equal(err.stderr, 'bad\n')
    assert.equal(err.error, 'exit status 3')
  })

  it('runs through a bash login shell (`-l -c`)', async () => {
    const result = await sandbox.commands.run('shopt -q login_shell && echo login; echo "$0"')
    assert.equal(result.stdout, 'login\n/bin/bash\n')
  })

  it('passes envs to that command only', async () => {
    const value = uniqueName('v')
    const first = await sandbox.commands.run('echo "$COMPAT_VAR"', { envs: { COMPAT_VAR: value } })
    assert.equal(first.stdout, `${value}\n`)
    const next = await sandbox.commands.run('echo "[${COMPAT_VAR-unset}]"')
    assert.equal(next.stdout, '[unset]\n')
  })

  it('sets E2B_SANDBOX=true and the user environment', async () => {
    const result = await sandbox.commands.run('echo "$E2B_SANDBOX $USER $HOME"')
    assert.equal(result.stdout, `true user ${HOME}\n`)
  })

  it('starts in the home directory by default and in cwd when given', async () => {
    assert.equal((await sandbox.commands.run('pwd')).stdout, `${HOME}\n`)
    assert.equal((await sandbox.commands.run('pwd', { cwd: '/tmp' })).stdout, '/tmp\n')
  })

  it('rejects a cwd that does not exist with InvalidArgumentError', async () => {
    const missing = `/tmp/${uniqueName('no-such-dir')}`
    const err = await rejection(sandbox.commands.run('pwd', { cwd: missing }))
    assert.ok(err instanceof InvalidArgumentError, `got ${err?.constructor?.name}: ${err?.message}`)
    assert.match(err.message, new RegExp(missing))
  })

  it('runs as `user` by default and as root with user: root', async () => {
    assert.equal((await sandbox.commands.run('whoami')).stdout, 'user\n')
    const root = await sandbox.commands.run('whoami; echo "$HOME"; pwd', { user: 'root' })
    assert.equal(root.stdout, 'root\n/root\n/root\n')
  })

  it('kills a command that outlives timeoutMs with TimeoutError', async () => {
    const started = Date.now()
    const err = await rejection(sandbox.commands.run('sleep 10', { timeoutMs: 1000 }))
    assert.ok(err instanceof TimeoutError, `got ${err?.constructor?.name}: ${err?.message}`)
    assert.ok(Date.now() - started < 5000, `took ${Date.now() - started} ms`)
  })

  it('leaves no process behind after timeoutMs', async () => {
    const handle = await sandbox.commands.run('sleep 10', { background: true, timeoutMs: 1000 })
    const err = await rejection(handle.wait())
    assert.ok(err instanceof TimeoutError, `got ${err?.constructor?.name}: ${err?.message}`)
    await waitFor(`pid ${handle.pid} to be gone`, () => processGone(handle.pid), 3000)
    const pids = (await sandbox.commands.list()).map((p) => p.pid)
    assert.ok(!pids.includes(handle.pid), `list still has ${handle.pid}: ${pids}`)
  })

  it('gives an EOF stdin by default, so `read` fails', async () => {
    const err = await rejection(sandbox.commands.run('read line'))
    assert.ok(err instanceof CommandExitError, `got ${err}`)
    assert.equal(err.exitCode, 1)
  })

  it('streams stdout and stderr to onStdout/onStderr as it is produced', async () => {
    const chunks = []
    const errChunks = []
    const result = await sandbox.commands.run(
      'echo one; sleep 0.5; echo two; echo warn >&2',
      {
        onStdout: (data) => chunks.push({ data, at: Date.now() }),
        onStderr: (data) => errChunks.push(data),
      },
    )
    const finished = Date.now()
    assert.equal(chunks.map((c) => c.data).join(''), 'one\ntwo\n')
    assert.equal(errChunks.join(''), 'warn\n')
    assert.equal(result.stdout, 'one\ntwo\n')
    const first = chunks.find((c) => c.data.includes('one'))
    // "one" must arrive while the command still sleeps, not with the end.
    assert.ok(finished - first.at >= 300, `"one" arrived ${finished - first.at} ms before the end`)
  })
})

describe('background commands', opts, () => {
  it('are listed, can be connected to and killed once', async () => {
    const handle = await sandbox.commands.run('sleep 30', { background: true })
    assert.ok(handle.pid > 0)
    try {
      const listed = (await sandbox.commands.list()).find((p) => p.pid === handle.pid)
      assert.ok(listed, `pid ${handle.pid} not in commands.list()`)
      assert.equal(listed.cmd, '/bin/bash')
      assert.deepEqual(listed.args, ['-l', '-c', 'sleep 30'])

      const again = await sandbox.commands.connect(handle.pid)
      assert.equal(again.pid, handle.pid)

      assert.equal(await sandbox.commands.kill(handle.pid), true)
      const err = await rejection(handle.wait())
      assert.ok(err instanceof CommandExitError, `wait after kill: ${err}`)
      assert.notEqual(err.exitCode, 0)
      await rejection(again.wait())

      assert.equal(await sandbox.commands.kill(handle.pid), false)
      const pids = (await sandbox.commands.list()).map((p) => p.pid)
      assert.ok(!pids.includes(handle.pid), `killed pid ${handle.pid} still listed`)
    } finally {
      await sandbox.commands.kill(handle.pid).catch(() => {})
    }
  })

  it('keep running after the client disconnects, and connect sees later output', async () => {
    const handle = await sandbox.commands.run('sleep 1; echo late; sleep 30', { background: true })
    try {
      await handle.disconnect()
      const out = []
      const again = await sandbox.commands.connect(handle.pid, { onStdout: (d) => out.push(d) })
      await waitFor('"late" through commands.connect', () => out.join('').includes('late\n'))
      assert.equal(await again.kill(), true)
    } finally {
      await sandbox.commands.kill(handle.pid).catch(() => {})
    }
  })

  it('kill ends the stream even when a grandchild still holds the output pipe', async () => {
    const marker = uniqueName('orphan')
    const handle = await sandbox.commands.run(`(exec -a ${marker} sleep 300) & sleep 300; echo not-reached`, { background: true })
    try {
      assert.equal(await sandbox.commands.kill(handle.pid), true)
      const started = Date.now()
      const err = await rejection(handle.wait())
      assert.ok(err instanceof CommandExitError, `wait after kill: ${err}`)
      assert.ok(Date.now() - started < 5000, `stream ended ${Date.now() - started} ms after kill`)
      assert.doesNotMatch(handle.stdout, /not-reached/)
    } finally {
      await sandbox.commands.run(`pkill -KILL -f '^${marker}' || true`, { user: 'root' })
    }
  })

  it('run concurrently, each with its own output', async () => {
    const results = await Promise.all(
      Array.from({ length: 10 }, (_, i) => sandbox.commands.run(`sleep 0.$((RANDOM % 3)); echo ${i}`)),
    )
    assert.deepEqual(results.map((r) => r.stdout), Array.from({ length: 10 }, (_, i) => `${i}\n`))
  })

  it('kill of an unknown pid returns false', async () => {
    assert.equal(await sandbox.commands.kill(2 ** 31 - 2), false)
  })
})

describe('stdin', opts, () => {
  it('sendStdin feeds the process and closeStdin ends it', async () => {
    const handle = await sandbox.commands.run('cat', { background: true, stdin: true })
    try {
      await sandbox.commands.sendStdin(handle.pid, 'hello\n')
      await handle.sendStdin(new TextEncoder().encode('world\n'))
      await waitFor('cat to echo both lines', () => handle.stdout === 'hello\nworld\n')
      await sandbox.commands.closeStdin(handle.pid)
      const result = await handle.wait()
      assert.equal(result.exitCode, 0)
      assert.equal(result.stdout, 'hello\nworld\n')
    } finally {
      await sandbox.commands.kill(handle.pid).catch(() => {})
    }
  })
})
