// sandbox.files through the official SDK: /files (read, write, gzip, metadata)
// and the filesystem.Filesystem RPCs (Stat, ListDir, MakeDir, Move, Remove,
// WatchDir).
import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { after, before, describe, it } from 'node:test'
import { FileNotFoundError, FileType, FilesystemEventType } from 'e2b'
import { HOME, rejection, releaseSandbox, scratchDir, testSandbox, uniqueName, waitFor } from './helpers.mjs'

const opts = { timeout: 60_000 }
let sandbox
let dir

before(async () => {
  sandbox = await testSandbox('files')
  dir = await scratchDir(sandbox, 'compat-files')
})

after(async () => {
  if (dir) await sandbox.files.remove(dir)
  await releaseSandbox(sandbox)
})

const sha256 = (bytes) => createHash('sha256').update(bytes).digest('hex')

async function readAll(stream) {
  const chunks = []
  for await (const chunk of stream) chunks.push(Buffer.from(chunk))
  return Buffer.concat(chunks)
}

describe('files.write and files.read', opts, () => {
  it('writes a string and reads it back as text', async () => {
    const path = `${dir}/hello.txt`
    const info = await sandbox.files.write(path, 'hello world')
    assert.deepEqual(
      { name: info.name, type: info.type, path: info.path, metadata: info.metadata },
      { name: 'hello.txt', type: FileType.FILE, path, metadata: undefined },
    )
    assert.equal(await sandbox.files.read(path), 'hello world')
  })

  it('overwrites an existing file', async () => {
    const path = `${dir}/overwrite.txt`
    await sandbox.files.write(path, 'a much longer first version')
    await sandbox.files.write(path, 'short')
    assert.equal(await sandbox.files.read(path), 'short')
  })

  it('creates missing parent directories owned by the user', async () => {
    const path = `${dir}/deep/er/nested.txt`
    await sandbox.files.write(path, 'nested')
    assert.equal(await sandbox.files.read(path), 'nested')
    const parent = await sandbox.files.getInfo(`${dir}/deep/er`)
    assert.equal(parent.type, FileType.DIR)
    assert.equal(parent.owner, 'user')
    assert.equal(parent.group, 'user')
  })

  it('resolves relative paths against the home directory', async () => {
    const name = `${uniqueName('relative')}.txt`
    try {
      const info = await sandbox.files.write(name, 'rel')
      assert.equal(info.path, `${HOME}/${name}`)
      assert.equal(await sandbox.files.read(`${HOME}/${name}`), 'rel')
    } finally {
      await sandbox.files.remove(name)
    }
  })

  it('writes a batch of files, in order, creating directories', async () => {
    const entries = [
      { path: `${dir}/batch/a.txt`, data: 'A' },
      { path: `${dir}/batch/sub/b.txt`, data: 'B' },
      { path: `${dir}/batch/sub/deeper/c.bin`, data: new Uint8Array([0, 1, 2, 255]).buffer },
    ]
    const infos = await sandbox.files.write(entries)
    assert.deepEqual(infos.map((i) => i.path), entries.map((e) => e.path))
    assert.deepEqual(infos.map((i) => i.name), ['a.txt', 'b.txt', 'c.bin'])
    assert.equal(await sandbox.files.read(entries[0].path), 'A')
    assert.equal(await sandbox.files.read(entries[1].path), 'B')
    assert.deepEqual(
      await sandbox.files.read(entries[2].path, { format: 'bytes' }),
      new Uint8Array([0, 1, 2, 255]),
    )
  })

  it('reads as bytes, blob and stream', async () => {
    const path = `${dir}/formats.bin`
    const data = randomBytes(70_000)
    await sandbox.files.write(path, new Uint8Array(data).buffer)
    const bytes = await sandbox.files.read(path, { format: 'bytes' })
    assert.ok(bytes instanceof Uint8Array)
    assert.equal(sha256(bytes), sha256(data))
    const blob = await sandbox.files.read(path, { format: 'blob' })
    assert.equal(sha256(Buffer.from(await blob.arrayBuffer())), sha256(data))
    const stream = await sandbox.files.read(path, { format: 'stream' })
    assert.equal(sha256(await readAll(stream)), sha256(data))
  })

  it('round-trips an empty file', async () => {
    const path = `${dir}/empty.txt`
    await sandbox.files.write(path, '')
    assert.equal(await sandbox.files.read(path), '')
    assert.equal((await sandbox.files.getInfo(path)).size, 0)
  })

  it('round-trips 10 MiB of random bytes (sha256)', async () => {
    const path = `${dir}/random-10m.bin`
    const data = randomBytes(10 << 20)
    await sandbox.files.write(path, new Uint8Array(data).buffer)
    assert.equal((await sandbox.files.getInfo(path)).size, data.length)
    const back = await sandbox.files.read(path, { format: 'bytes' })
    assert.equal(back.length, data.length)
    assert.equal(sha256(back), sha256(data))
  })

  it('uploads a ReadableStream (octet-stream) intact', async () => {
    const path = `${dir}/streamed.bin`
    const data = randomBytes(3 << 20)
    const stream = new Blob([data]).stream()
    const info = await sandbox.files.write(path, stream)
    assert.equal(info.path, path)
    assert.equal(sha256(await sandbox.files.read(path, { format: 'bytes' })), sha256(data))
  })

  it('writes with gzip: true and reads with gzip: true', async () => {
    const path = `${dir}/gzipped.txt`
    const text = 'compress me '.repeat(10_000)
    await sandbox.files.write(path, text, { gzip: true })
    assert.equal((await sandbox.files.getInfo(path)).size, text.length, 'stored decompressed')
    assert.equal(await sandbox.files.read(path, { gzip: true }), text)
    assert.equal(await sandbox.files.read(path), text)
  })

  it('writes as root when asked, owned by root', async () => {
    const path = `/tmp/${uniqueName('compat-root')}.txt`
    try {
      await sandbox.files.write(path, 'root', { user: 'root' })
      const info = await sandbox.files.getInfo(path)
      assert.equal(info.owner, 'root')
      assert.equal(info.group, 'root')
    } finally {
      await sandbox.files.remove(path, { user: 'root' })
    }
  })

  it('reading a missing file throws FileNotFoundError', async () => {
    const err = await rejection(sandbox.files.read(`${dir}/does-not-exist.txt`))
    assert.ok(err instanceof FileNotFoundError, `got ${err?.constructor?.name}: ${err?.message}`)
  })
})

describe('file metadata', opts, () => {
  it('stores metadata with the file and getInfo returns it', async () => {
    const path = `${dir}/meta.txt`
    const info = await sandbox.files.write(path, 'm', { metadata: { k: 'v', Owner: 'Team A' } })
    // Keys are lowercased by the sandbox (SDK docs).
    assert.deepEqual(info.metadata, { k: 'v', owner: 'Team A' })
    assert.deepEqual((await sandbox.files.getInfo(path)).metadata, { k: 'v', owner: 'Team A' })
    const listed = (await sandbox.files.list(dir)).find((e) => e.path === path)
    assert.deepEqual(listed.metadata, { k: 'v', owner: 'Team A' })
  })

  it('a write without metadata clears it', async () => {
    const path = `${dir}/meta-cleared.txt`
    await sandbox.files.write(path, 'one', { metadata: { k: 'v' } })
    const info = await sandbox.files.write(path, 'two')
    assert.equal(info.metadata, undefined)
    assert.equal((await sandbox.files.getInfo(path)).metadata, undefined)
  })
})

describe('files.getInfo and files.exists', opts, () => {
  it('describes a file: type, size, mode, owner, group, time', async () => {
    const path = `${dir}/info.txt`
    const before = Date.now()
    await sandbox.files.write(path, 'twelve bytes')
    const info = await sandbox.files.getInfo(path)
    assert.equal(info.name, 'info.txt')
    assert.equal(info.path, path)
    assert.equal(info.type, FileType.FILE)
    assert.equal(info.size, 12)
    assert.equal(info.mode, 0o644)
    assert.equal(info.permissions, '-rw-r--r--')
    assert.equal(info.owner, 'user')
    assert.equal(info.group, 'user')
    assert.equal(info.symlinkTarget, undefined)
    assert.ok(info.modifiedTime instanceof Date)
    assert.ok(Math.abs(info.modifiedTime.getTime() - before) < 60_000, `mtime ${info.modifiedTime}`)
  })

  it('describes a directory', async () => {
    const info = await sandbox.files.getInfo(dir)
    assert.equal(info.type, FileType.DIR)
    assert.equal(info.mode, 0o755)
    assert.equal(info.permissions, 'drwxr-xr-x')
    assert.equal(info.owner, 'user')
  })

  it('getInfo of a missing path throws FileNotFoundError', async () => {
    const err = await rejection(sandbox.files.getInfo(`${dir}/missing`))
    assert.ok(err instanceof FileNotFoundError, `got ${err?.constructor?.name}: ${err?.message}`)
  })

  it('exists is true for files and directories, false otherwise', async () => {
    await sandbox.files.write(`${dir}/exists.txt`, 'x')
    assert.equal(await sandbox.files.exists(`${dir}/exists.txt`), true)
    assert.equal(await sandbox.files.exists(dir), true)
    assert.equal(await sandbox.files.exists(`${dir}/nope.txt`), false)
  })
})

describe('files.list', opts, () => {
  let tree
  before(async () => {
    tree = `${dir}/tree`
    await sandbox.files.write([
      { path: `${tree}/top.txt`, data: 'top' },
      { path: `${tree}/a/mid.txt`, data: 'mid' },
      { path: `${tree}/a/b/low.txt`, data: 'low' },
    ])
  })

  it('lists one level by default', async () => {
    const entries = await sandbox.files.list(tree)
    assert.deepEqual(entries.map((e) => e.path).sort(), [`${tree}/a`, `${tree}/top.txt`])
    const a = entries.find((e) => e.name === 'a')
    assert.equal(a.type, FileType.DIR)
    const top = entries.find((e) => e.name === 'top.txt')
    assert.equal(top.type, FileType.FILE)
    assert.equal(top.size, 3)
    assert.equal(top.owner, 'user')
  })

  it('walks deeper with depth', async () => {
    const two = (await sandbox.files.list(tree, { depth: 2 })).map((e) => e.path).sort()
    assert.deepEqual(two, [`${tree}/a`, `${tree}/a/b`, `${tree}/a/mid.txt`, `${tree}/top.txt`])
    const three = (await sandbox.files.list(tree, { depth: 3 })).map((e) => e.path).sort()
    assert.deepEqual(three, [
      `${tree}/a`, `${tree}/a/b`, `${tree}/a/b/low.txt`, `${tree}/a/mid.txt`, `${tree}/top.txt`,
    ])
  })

  it('listing a missing directory throws FileNotFoundError', async () => {
    const err = await rejection(sandbox.files.list(`${dir}/no-such-dir`))
    assert.ok(err instanceof FileNotFoundError, `got ${err?.constructor?.name}: ${err?.message}`)
  })
})

describe('files.makeDir, rename, remove', opts, () => {
  it('makeDir creates parents and returns false when the directory exists', async () => {
    const path = `${dir}/made/with/parents`
    assert.equal(await sandbox.files.makeDir(path), true)
    const info = await sandbox.files.getInfo(path)
    assert.equal(info.type, FileType.DIR)
    assert.equal(info.owner, 'user')
    assert.equal(await sandbox.files.makeDir(path), false)
  })

  it('rename moves a file and returns the new entry', async () => {
    const from = `${dir}/old-name.txt`
    const to = `${dir}/renamed/new-name.txt`
    await sandbox.files.write(from, 'moving')
    const info = await sandbox.files.rename(from, to)
    assert.equal(info.path, to)
    assert.equal(info.name, 'new-name.txt')
    assert.equal(info.type, FileType.FILE)
    assert.equal(await sandbox.files.exists(from), false)
    assert.equal(await sandbox.files.read(to), 'moving')
  })

  it('rename of a missing source throws FileNotFoundError', async () => {
    const err = await rejection(sandbox.files.rename(`${dir}/ghost.txt`, `${dir}/ghost2.txt`))
    assert.ok(err instanceof FileNotFoundError, `got ${err?.constructor?.name}: ${err?.message}`)
  })

  it('remove deletes files and whole directories; a missing path is fine', async () => {
    await sandbox.files.write(`${dir}/doomed/inner/file.txt`, 'x')
    await sandbox.files.remove(`${dir}/doomed/inner/file.txt`)
    assert.equal(await sandbox.files.exists(`${dir}/doomed/inner/file.txt`), false)
    await sandbox.files.remove(`${dir}/doomed`)
    assert.equal(await sandbox.files.exists(`${dir}/doomed`), false)
    await sandbox.files.remove(`${dir}/doomed`)
  })
})

describe('files.watchDir', opts, () => {
  it('reports a file created in the watched directory', async () => {
    const watched = `${dir}/watch-flat`
    await sandbox.files.makeDir(watched)
    const events = []
    const handle = await sandbox.files.watchDir(watched, (e) => events.push(e))
    try {
      await sandbox.files.write(`${watched}/new.txt`, 'hi')
      await waitFor(`a create event for new.txt; got ${JSON.stringify(events)}`,
        () => events.some((e) => e.name === 'new.txt' && e.type === FilesystemEventType.CREATE))
    } finally {
      await handle.stop()
    }
  })

  it('recursive: a file in a new subdirectory is reported by its relative name', async () => {
    const watched = `${dir}/watch-rec`
    await sandbox.files.makeDir(watched)
    const events = []
    const handle = await sandbox.files.watchDir(watched, (e) => events.push(e), { recursive: true })
    try {
      await sandbox.files.makeDir(`${watched}/sub`)
      await waitFor('the new subdirectory event', () => events.some((e) => e.name === 'sub'))
      await sandbox.files.write(`${watched}/sub/inner.txt`, 'deep')
      await waitFor(`an event for sub/inner.txt; got ${JSON.stringify(events)}`,
        () => events.some((e) => e.name === 'sub/inner.txt' &&
          [FilesystemEventType.CREATE, FilesystemEventType.WRITE].includes(e.type)))
    } finally {
      await handle.stop()
    }
  })

  it('includeEntry: events carry the entry', async () => {
    const watched = `${dir}/watch-entry`
    await sandbox.files.makeDir(watched)
    const events = []
    const handle = await sandbox.files.watchDir(watched, (e) => events.push(e), { includeEntry: true })
    try {
      await sandbox.files.write(`${watched}/with-entry.txt`, 'abc')
      const ev = await waitFor('an event with an entry', () =>
        events.find((e) => e.name === 'with-entry.txt' && e.entry?.path === `${watched}/with-entry.txt`))
      assert.equal(ev.entry.type, FileType.FILE)
      assert.equal(ev.entry.owner, 'user')
    } finally {
      await handle.stop()
    }
  })

  it('reports removal', async () => {
    const watched = `${dir}/watch-rm`
    await sandbox.files.write(`${watched}/gone.txt`, 'x')
    const events = []
    const handle = await sandbox.files.watchDir(watched, (e) => events.push(e))
    try {
      await sandbox.files.remove(`${watched}/gone.txt`)
      await waitFor(`a remove event; got ${JSON.stringify(events)}`,
        () => events.some((e) => e.name === 'gone.txt' && e.type === FilesystemEventType.REMOVE))
    } finally {
      await handle.stop()
    }
  })

  it('watching a missing directory throws FileNotFoundError', async () => {
    const err = await rejection(sandbox.files.watchDir(`${dir}/not-there`, () => {}))
    assert.ok(err instanceof FileNotFoundError, `got ${err?.constructor?.name}: ${err?.message}`)
  })
})
