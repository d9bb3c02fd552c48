// sandbox.pty through the official SDK: Process.Start with a PTY, SendInput
// (pty bytes), Update (resize), Connect and SendSignal.
import assert from 'node:assert/strict'
import { after, before, describe, it } from 'node:test'
import { CommandExitError } from 'e2b'
import { rejection, releaseSandbox, testSandbox, waitFor } from './helpers.mjs'

const opts = { timeout: 30_000 }
const encoder = new TextEncoder()
let sandbox

before(async () => {
  sandbox = await testSandbox('pty')
})

after(async () => {
  await releaseSandbox(sandbox)
})

// plain drops terminal escape sequences (colours, titles, bracketed paste).
const plain = (text) => text.replace(/\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07/g, '')

// terminal opens a PTY and collects everything it prints.
async function terminal(size = { cols: 80, rows: 24 }, extra = {}) {
  const term = { output: '', decoder: new TextDecoder() }
  term.handle = await sandbox.pty.create({
    ...size,
    ...extra,
    onData: (data) => (term.output += term.decoder.decode(data, { stream: true })),
  })
  term.type = (line) => sandbox.pty.sendInput(term.handle.pid, encoder.encode(line))
  // expect waits for pattern in the output printed after `from`.
  term.expect = (pattern, from = 0) =>
    waitFor(`${pattern} on the terminal; got ${JSON.stringify(term.output.slice(from))}`,
      () => plain(term.output.slice(from)).match(pattern))
  return term
}

describe('pty', opts, () => {
  const opened = []
  after(async () => {
    for (const pid of opened) await sandbox.pty.kill(pid).catch(() => {})
  })

  it('runs an interactive shell that answers input', async () => {
    const term = await terminal()
    opened.push(term.handle.pid)
    await term.type('echo $((40 + 2))\n')
    // The typed line echoes "$((40 + 2))"; only the shell's answer is "42".
    await term.expect(/[\r\n]42\r\n/)
  })

  it('is a real terminal of the requested size with TERM=xterm-256color', async () => {
    const term = await terminal({ cols: 91, rows: 33 })
    opened.push(term.handle.pid)
    await term.type('stty size; echo "term=$TERM"; tty\n')
    await term.expect(/[\r\n]33 91\r\n/)
    await term.expect(/term=xterm-256color\r\n/)
    await term.expect(/\/dev\/pts\/\d+\r\n/)
  })

  it('resize changes the size stty reports', async () => {
    const term = await terminal({ cols: 80, rows: 24 })
    opened.push(term.handle.pid)
    await sandbox.pty.resize(term.handle.pid, { cols: 120, rows: 40 })
    const from = term.output.length
    await term.type('stty size\n')
    await term.expect(/[\r\n]40 120\r\n/, from)
  })

  it('runs as the default user, in its home', async () => {
    const term = await terminal()
    opened.push(term.handle.pid)
    await term.type('echo "who=$(whoami) at=$(pwd)"\n')
    await term.expect(/who=user at=\/home\/user\r\n/)
  })

  it('ends with exit code 0 when the shell exits', async () => {
    const term = await terminal()
    await term.type('exit\n')
    const result = await term.handle.wait()
    assert.equal(result.exitCode, 0)
  })

  it('connect attaches a second reader to a running PTY', async () => {
    const term = await terminal()
    opened.push(term.handle.pid)
    let seen = ''
    const decoder = new TextDecoder()
    const second = await sandbox.pty.connect(term.handle.pid, {
      onData: (data) => (seen += decoder.decode(data, { stream: true })),
    })
    assert.equal(second.pid, term.handle.pid)
    await term.type('echo $((6 * 7))-via-connect\n')
    await waitFor(`connected reader to see the answer; got ${JSON.stringify(seen)}`,
      () => /[\r\n]42-via-connect\r\n/.test(plain(seen)))
    await second.disconnect()
  })

  it('kill ends the PTY: true once, then false', async () => {
    const term = await terminal()
    assert.equal(await sandbox.pty.kill(term.handle.pid), true)
    const err = await rejection(term.handle.wait())
    assert.ok(err instanceof CommandExitError, `wait after kill: ${err}`)
    assert.equal(await sandbox.pty.kill(term.handle.pid), false)
    const pids = (await sandbox.commands.list()).map((p) => p.pid)
    assert.ok(!pids.includes(term.handle.pid), `killed PTY ${term.handle.pid} still listed`)
  })
})
