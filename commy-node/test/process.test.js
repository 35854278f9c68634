'use strict'
// Node services and Node clients in separate processes.

const test = require('node:test')
const { after } = require('node:test')
const assert = require('node:assert/strict')
const { spawn } = require('node:child_process')
const fs = require('node:fs')
const net = require('node:net')

const { Mesh } = require('..')
const { CHILD, runtimeDir, start, run } = require('../support/helpers')

test('a Node service answers Node clients in three other processes', async () => {
  const dir = runtimeDir()
  const server = start(process.execPath, [CHILD, 'serve', 'greeter'], { dir })
  await server.started
  const clients = await Promise.all([1, 2, 3].map(() => run(process.execPath, [CHILD, 'call', 'greeter', '200'], { dir })))
  for (const c of clients) {
    assert.equal(c.code, 0, c.stderr)
    assert.deepEqual(JSON.parse(c.stdout).pids, [server.pid])
  }
  // The service process exits by itself once `stop` closed its mesh.
  const mesh = await Mesh.open({ runtimeDir: dir })
  assert.equal((await mesh.call('stop', '')).toString(), 'stopping')
  await mesh.close()
  assert.equal(await server.exited, 0, server.output())
})

test('two instances of a service share the calls', async () => {
  const dir = runtimeDir()
  const servers = [start(process.execPath, [CHILD, 'serve', 'pool'], { dir }), start(process.execPath, [CHILD, 'serve', 'pool'], { dir })]
  await Promise.all(servers.map((s) => s.started))
  const c = await run(process.execPath, [CHILD, 'call', 'pool', '400'], { dir })
  assert.equal(c.code, 0, c.stderr)
  assert.deepEqual(JSON.parse(c.stdout).pids.sort(), servers.map((s) => s.pid).sort())
  for (const s of servers) s.kill('SIGTERM')
})

test('a process whose mesh is closed exits with nothing left to do', async () => {
  const dir = runtimeDir()
  // `run` fails the test if the process is still there after 30 s: a
  // closed mesh must leave nothing that keeps the event loop alive.
  const r = await run(process.execPath, [CHILD, 'idle'], { dir, timeoutMs: 30_000 })
  assert.equal(r.code, 0, r.stderr)
  assert.equal(r.stdout, 'closed\n')
})

test('a region written by one process is read by another', async () => {
  const dir = runtimeDir()
  const writer = spawn(process.execPath, [CHILD, 'region-write', 'board', 'from the writer'], {
    env: { ...process.env, COMMY_RUNTIME_DIR: dir },
    stdio: ['pipe', 'pipe', 'inherit'],
  })
  await new Promise((resolve, reject) => {
    writer.stdout.on('data', (d) => d.toString().includes('ready') && resolve())
    writer.on('exit', (code) => reject(new Error(`writer exited ${code}`)))
  })
  const mesh = await Mesh.open({ runtimeDir: dir })
  const region = mesh.region('board', { size: 64, create: 'open' })
  assert.equal(region.read(0, 15).toString(), 'from the writer')
  region.close()
  await mesh.close()
  writer.stdin.end()
  assert.equal(await new Promise((r) => writer.on('exit', r)), 0)
})

test('a subscriber with no listener gets the messages of another host', async () => {
  // Short runtime dirs: the socket path of a queue group member under
  // another host id is long.
  const short = (prefix) => {
    const dir = fs.mkdtempSync(`/tmp/${prefix}`)
    fs.chmodSync(dir, 0o700)
    after(() => fs.rmSync(dir, { recursive: true, force: true }))
    return dir
  }
  // host-a: a publisher that listens over TLS, with a runtime dir and a
  // dev CA of its own.
  const a = short('cna-')
  const port = await new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
  })
  const publisher = start(process.execPath, [CHILD, 'publish-remote'], {
    dir: a,
    env: { COMMY_HOST_ID: 'host-a', XDG_CONFIG_HOME: a, COMMY_LISTEN: `tls://127.0.0.1:${port}` },
  })
  await publisher.started
  // host-b: this process, which only connects.
  const b = short('cnb-')
  const saved = process.env.COMMY_HOST_ID
  process.env.COMMY_HOST_ID = 'host-b'
  let mesh
  try {
    mesh = await Mesh.open({
      runtimeDir: b,
      peers: [`tls://127.0.0.1:${port}`],
      tlsCa: `${a}/commy/dev-ca/ca.pem`,
    })
  } finally {
    if (saved === undefined) delete process.env.COMMY_HOST_ID
    else process.env.COMMY_HOST_ID = saved
  }
  const news = await mesh.subscribe('news')
  const jobs = await mesh.subscribe('jobs', { group: 'workers' })
  for (const [sub, count] of [
    [news, 200],
    [jobs, 50],
  ]) {
    const got = []
    while (got.length < count) {
      const { value, done } = await sub.next()
      assert.equal(done, false, publisher.output())
      if (value.toString() !== 'probe') got.push(Number(value.toString()))
    }
    assert.deepEqual(got, [...Array(count).keys()])
  }
  await mesh.close()
  publisher.stdin.end()
  assert.equal(await publisher.exited, 0, publisher.output())
})
