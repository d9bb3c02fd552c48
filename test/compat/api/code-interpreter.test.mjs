// The unchanged npm @e2b/code-interpreter against warren (README mode A): its
// Sandbox.create() asks for the template code-interpreter-v1, which `warren
// up` builds from base in the background after it starts (the test waits for
// it), and runCode and the code contexts talk to warren's code interpreter
// server on port 49999 through warren's proxy.
import assert from 'node:assert/strict'
import { after, before, describe, it } from 'node:test'
import { Sandbox } from '@e2b/code-interpreter'

const opts = { timeout: 10 * 60_000 }
let sbx

before(async () => {
  // The template may still be building (a cold start builds base first).
  const deadline = Date.now() + 8 * 60_000
  for (;;) {
    try {
      sbx = await Sandbox.create({ timeoutMs: 15 * 60_000, metadata: { compat: 'code-interpreter' } })
      return
    } catch (err) {
      if (!/not found/i.test(String(err?.message)) || Date.now() > deadline) throw err
      await new Promise((r) => setTimeout(r, 2000))
    }
  }
}, opts)

after(async () => {
  await sbx?.kill().catch(() => {})
})

describe('@e2b/code-interpreter', opts, () => {
  it('creates its default template, code-interpreter-v1', async () => {
    const info = await sbx.getInfo()
    assert.equal(info.name, 'code-interpreter-v1')
  })

  it('runs code: stdout, the last expression as the main result, the execution count', async () => {
    const e = await sbx.runCode('x = 21\nprint("hello")\nx * 2')
    assert.equal(e.text, '42')
    assert.deepEqual(e.logs, { stdout: ['hello\n'], stderr: [] })
    assert.equal(e.error, undefined)
    assert.ok(e.executionCount >= 1)
    const next = await sbx.runCode('x + 1')
    assert.equal(next.text, '22', 'the default context keeps its variables')
    assert.equal(next.executionCount, e.executionCount + 1)
  })

  it('reports errors with their name, value and traceback', async () => {
    const e = await sbx.runCode('def f():\n    return 1/0\nf()')
    assert.equal(e.error.name, 'ZeroDivisionError')
    assert.equal(e.error.value, 'division by zero')
    assert.match(e.error.traceback, /return 1\/0/)
  })

  it('streams output to the callbacks as it comes, and takes env vars for one run', async () => {
    const out = []
    const err = []
    const e = await sbx.runCode(
      'import os, sys, time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.3)\nsys.stderr.write("warn\\n")\nos.system("echo child")\nos.environ["GREETING"]',
      { envs: { GREETING: 'hi' }, onStdout: (m) => out.push(m.line), onStderr: (m) => err.push(m.line) },
    )
    assert.deepEqual(out, ['0\n', '1\n', '2\n', 'child\n'])
    assert.deepEqual(err, ['warn\n'])
    assert.equal(e.text, "'hi'")
    const after = await sbx.runCode('import os\nos.environ.get("GREETING")')
    assert.equal(after.text, undefined, 'the env var is gone after its run')
  })

  it('returns rich results: display() and _repr_html_', async () => {
    const e = await sbx.runCode(
      'class T:\n    def __repr__(self): return "T()"\n    def _repr_html_(self): return "<table></table>"\ndisplay(T())\nT()',
    )
    assert.equal(e.results.length, 2)
    assert.equal(e.results[0].isMainResult, false)
    assert.equal(e.results[1].isMainResult, true)
    for (const r of e.results) {
      assert.equal(r.text, 'T()')
      assert.equal(r.html, '<table></table>')
      assert.deepEqual(r.formats(), ['html'])
    }
  })

  it('creates, lists, runs in, restarts and removes code contexts', async () => {
    const ctx = await sbx.createCodeContext({ cwd: '/tmp' })
    assert.equal(ctx.language, 'python')
    assert.equal(ctx.cwd, '/tmp')
    assert.deepEqual((await sbx.listCodeContexts()).map((c) => c.id), [ctx.id])
    const e = await sbx.runCode('import os\nz = 5\nos.getcwd()', { context: ctx })
    assert.equal(e.text, "'/tmp'")
    assert.equal((await sbx.runCode('z', { context: ctx })).text, '5')
    assert.equal((await sbx.runCode('z')).error?.name, 'NameError', 'contexts do not share variables')
    await sbx.restartCodeContext(ctx)
    assert.equal((await sbx.runCode('z', { context: ctx })).error?.name, 'NameError', 'a restart forgets')
    await sbx.removeCodeContext(ctx)
    assert.deepEqual(await sbx.listCodeContexts(), [])
    // A short request timeout: the SDK leaves its timer armed when the
    // request fails, which would hold the test process for a minute.
    await assert.rejects(sbx.runCode('1', { context: ctx, requestTimeoutMs: 5000 }), /not found/i)
  })

  it('runs as the sandbox user, beside the envd API of the same sandbox', async () => {
    const e = await sbx.runCode('import getpass, pathlib\npathlib.Path("/home/user/from-interpreter.txt").write_text("ok")\ngetpass.getuser()')
    assert.equal(e.text, "'user'")
    assert.equal(await sbx.files.read('/home/user/from-interpreter.txt'), 'ok')
  })
})
