'use strict'
// Node services and Node clients in separate processes.

const test = require('node:test')
const assert = require('node:assert/strict')
const { spawn } = require('node:child_process')

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
