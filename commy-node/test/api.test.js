'use strict'
// The Promise API in one process: calls, errors, services, pub/sub, regions.

const test = require('node:test')
const assert = require('node:assert/strict')

const { Mesh, Publisher, CommyError, codes } = require('..')
const { runtimeDir } = require('../support/helpers')

async function withMesh(fn) {
  const mesh = await Mesh.open({ runtimeDir: runtimeDir() })
  try {
    await fn(mesh)
  } finally {
    await mesh.close()
  }
}

async function rejectsWith(promise, code, pattern) {
  await assert.rejects(promise, (e) => {
    assert.ok(e instanceof CommyError, `expected a CommyError, got ${e?.stack ?? e}`)
    assert.ok(e instanceof Error)
    assert.equal(e.code, code, e.message)
    if (pattern) assert.match(e.message, pattern)
    return true
  })
}

test('a call reaches a service and its reply comes back as a Buffer', () =>
  withMesh(async (mesh) => {
    await mesh.serve('echo', async (req) => req)
    await mesh.serve('upper', (req) => req.toString().toUpperCase())
    const reply = await mesh.call('echo', Buffer.from('hi'), { timeoutMs: 1000 })
    assert.ok(Buffer.isBuffer(reply))
    assert.equal(reply.toString(), 'hi')
    assert.equal((await mesh.call('upper', 'abc')).toString(), 'ABC')
    assert.deepEqual([...(await mesh.call('echo', new Uint8Array([1, 2, 3])))], [1, 2, 3])
    assert.equal((await mesh.call('echo', Buffer.alloc(0))).length, 0)
    const big = Buffer.alloc(1 << 20, 7)
    assert.ok((await mesh.call('echo', big)).equals(big))
  }))

test('thousands of calls in flight each get their own answer', () =>
  withMesh(async (mesh) => {
    await mesh.serve('double', async (req) => Buffer.from(String(Number(req.toString()) * 2)))
    const n = 5000
    const replies = await Promise.all(Array.from({ length: n }, (_, i) => mesh.call('double', String(i))))
    replies.forEach((r, i) => assert.equal(r.toString(), String(i * 2)))
  }))

// The calls made in one turn reach the addon together (one crossing), yet
// each keeps its own outcome, and the order of everything sent.
test('calls made in one turn each get their own outcome, in order with sends', () =>
  withMesh(async (mesh) => {
    const seen = []
    await mesh.serve('echo', async (req) => req)
    await mesh.serve('log', (req) => {
      seen.push(req.toString())
      return req
    })
    await mesh.call('log', 'warm-up')
    seen.length = 0
    const big = Buffer.alloc(64 * 1024, 3)
    const calls = []
    for (let i = 0; i < 3000; i++) {
      if (i === 1500) calls.push(mesh.call('echo', big))
      else if (i === 2000) calls.push(mesh.call('echo', 'x', { timeoutMs: 1e300 }))
      else if (i === 2500) calls.push(mesh.call('echo', big, { timeoutMs: 1e300 }))
      else calls.push(mesh.call('echo', String(i), { timeoutMs: i % 2 === 0 ? 10_000 : undefined }))
    }
    const ordered = [mesh.call('log', 'a'), mesh.send('log', 'b'), mesh.call('log', 'c')]
    const outcomes = await Promise.allSettled(calls)
    outcomes.forEach((o, i) => {
      if (i === 2000 || i === 2500) {
        assert.equal(o.status, 'rejected')
        assert.ok(o.reason instanceof CommyError, String(o.reason))
        assert.equal(o.reason.code, 'INVALID_ARGUMENT')
        assert.match(o.reason.message, /timeoutMs/)
      } else if (i === 1500) {
        assert.ok(o.value.equals(big))
      } else {
        assert.equal(o.value.toString(), String(i))
      }
    })
    await Promise.all(ordered)
    await new Promise((resolve) => setTimeout(resolve, 50))
    assert.deepEqual(seen, ['a', 'b', 'c'])
    // The native layer refuses a malformed call table whole.
    const native = mesh._native
    assert.throws(() => native.callMany(Buffer.alloc(8), 1, Buffer.alloc(0)), /fewer than 1 calls/)
    const table = new Float64Array([7, 0, 10, -1])
    assert.throws(() => native.callMany(Buffer.from(table.buffer), 1, Buffer.alloc(4)), /exceed their data/)
    table[0] = 0.5
    assert.throws(() => native.callMany(Buffer.from(table.buffer), 1, Buffer.alloc(10)), /call id/)
    // And a malformed answer table: nothing in it is answered.
    assert.throws(() => native.replyMany(Buffer.alloc(8), 2, Buffer.alloc(0)), /fewer than 2 answers/)
    const answers = new Uint32Array([0, 0, 1, 5])
    assert.throws(() => native.replyMany(Buffer.from(answers.buffer), 2, Buffer.alloc(4)), /exceed their data/)
  }))

// A turn's calls (and a batch of answers) cross in one buffer kept between
// crossings and grown on demand, or a buffer of their own past 1 MiB: every
// payload keeps its own bytes either way, and the next batch does not see
// the last one's.
test('batched payloads of every size keep their own bytes', () =>
  withMesh(async (mesh) => {
    await mesh.serve('echo', async (req) => Buffer.from(req))
    const payload = (i, size) => Buffer.alloc(size, i % 251)
    for (const [n, most] of [
      [50, 100],
      [300, 1000],
      [200, 8000],
      [300, 16000],
      [40, 3],
    ]) {
      const sent = Array.from({ length: n }, (_, i) => payload(i, 1 + ((i * 7919) % most)))
      const replies = await Promise.all(sent.map((p) => mesh.call('echo', p)))
      replies.forEach((r, i) => assert.ok(r.equals(sent[i]), `call ${i} of ${n}: ${r.length} bytes back`))
    }
  }))

// The JS thread receives its services' requests itself: while it waits to
// send (a request larger than the ring, to a service of its own) or runs a
// long synchronous handler, the link's watcher receives for it.
test('a busy event loop still takes its own requests in', () =>
  withMesh(async (mesh) => {
    await mesh.serve('echo', async (req) => req)
    await mesh.serve('busy', (req) => {
      const end = Date.now() + 50
      while (Date.now() < end) {}
      return req
    })
    const big = Buffer.alloc(8 << 20)
    for (let i = 0; i < big.length; i += 4096) big[i] = i >> 12
    const [a, b] = await Promise.all([mesh.call('echo', big), mesh.call('echo', big)])
    assert.ok(a.equals(big) && b.equals(big))
    const calls = [mesh.call('busy', 'x')]
    for (let i = 0; i < 200; i++) calls.push(mesh.call('echo', String(i)))
    const replies = await Promise.all(calls)
    assert.equal(replies[0].toString(), 'x')
    replies.slice(1).forEach((r, i) => assert.equal(r.toString(), String(i)))
  }))

test('errors carry the status name as code', () =>
  withMesh(async (mesh) => {
    await rejectsWith(mesh.call('nobody', 'x'), 'NOT_FOUND', /nobody/)
    await mesh.serve('never', () => new Promise(() => {}))
    await rejectsWith(mesh.call('never', 'x', { timeoutMs: 100 }), 'DEADLINE_EXCEEDED')
    await mesh.serve('denied', () => {
      throw new CommyError('PERMISSION_DENIED', 'not you')
    })
    await rejectsWith(mesh.call('denied', 'x'), 'PERMISSION_DENIED', /not you/)
    await mesh.serve('coded', async () => {
      const e = new Error('try later')
      e.code = 'UNAVAILABLE'
      throw e
    })
    await rejectsWith(mesh.call('coded', 'x'), 'UNAVAILABLE', /try later/)
    assert.ok(codes.includes('NOT_FOUND') && codes.includes('DEADLINE_EXCEEDED'))
  }))

test('a handler that throws gives INTERNAL and the service keeps serving', () =>
  withMesh(async (mesh) => {
    let n = 0
    const quiet = console.error
    console.error = () => {}
    try {
      await mesh.serve('flaky', async (req) => {
        n++
        if (req.toString() === 'boom') throw new Error('exploded')
        if (req.toString() === 'sync') throw new TypeError('thrown at once')
        if (req.toString() === 'bad') return 42
        return 'fine'
      })
      await rejectsWith(mesh.call('flaky', 'boom'), 'INTERNAL', /exploded/)
      await rejectsWith(mesh.call('flaky', 'sync'), 'INTERNAL', /thrown at once/)
      await rejectsWith(mesh.call('flaky', 'bad'), 'INTERNAL', /Buffer/)
      assert.equal((await mesh.call('flaky', 'ok')).toString(), 'fine')
    } finally {
      console.error = quiet
    }
    assert.equal(n, 4)
  }))

test('a handler that asks for a signal learns when its caller gives up', () =>
  withMesh(async (mesh) => {
    let aborted
    const abortedWith = new Promise((r) => (aborted = r))
    await mesh.serve('patient', (req, { signal }) => {
      assert.ok(signal instanceof AbortSignal)
      assert.equal(signal.aborted, false)
      return new Promise((_, reject) => {
        signal.addEventListener('abort', () => {
          aborted(signal.reason)
          reject(signal.reason)
        })
      })
    })
    await rejectsWith(mesh.call('patient', 'x', { timeoutMs: 100 }), 'DEADLINE_EXCEEDED')
    const reason = await abortedWith
    assert.ok(reason instanceof CommyError)
    assert.equal(reason.code, 'CANCELLED')
    // Handlers that answer are not told anything.
    await mesh.serve('prompt', async (req, { signal }) => (signal.aborted ? 'aborted' : 'fine'))
    assert.equal((await mesh.call('prompt', 'x')).toString(), 'fine')
  }))

test('handlers see who called them, with a signal or without', () =>
  withMesh(async (mesh) => {
    const contexts = { fast: [], signal: [] }
    // A defaulted second parameter does not count: this one stays on the
    // path whose requests the JS thread takes out of the rings itself.
    await mesh.serve('whoami', (req, context = undefined) => {
      contexts.fast.push(context)
      return context.caller.kind
    })
    await mesh.serve('whoami-signal', (req, context) => {
      contexts.signal.push(context)
      return context.caller.kind
    })
    const calls = ['whoami', 'whoami-signal', 'whoami', 'whoami-signal']
    // In flight together (one drain) and one after the other.
    const together = await Promise.all(calls.map((name) => mesh.call(name, 'x')))
    for (const name of calls) assert.equal((await mesh.call(name, 'x')).toString(), 'local')
    assert.deepEqual(together.map(String), ['local', 'local', 'local', 'local'])
    const me = { kind: 'local', uid: process.geteuid(), gid: process.getegid(), pid: process.pid, identity: null, addr: null }
    const all = [...contexts.fast, ...contexts.signal]
    assert.equal(all.length, 8)
    for (const context of all) assert.deepEqual({ ...context.caller }, me)
    // One caller object for this process's requests, frozen.
    for (const context of all) assert.equal(context.caller, all[0].caller)
    assert.ok(Object.isFrozen(all[0].caller))
    // The fast path's context is made once per caller, and its signal never fires.
    for (const context of contexts.fast) assert.equal(context, contexts.fast[0])
    assert.ok(Object.isFrozen(contexts.fast[0]))
    assert.equal(contexts.fast[0].signal.aborted, false)
    // The signal path's is made per request, with a signal of its own.
    assert.notEqual(contexts.signal[0], contexts.signal[1])
    assert.notEqual(contexts.signal[0].signal, contexts.signal[1].signal)
  }))

test('bad arguments are refused with errors that name them', () =>
  withMesh(async (mesh) => {
    await assert.rejects(mesh.call(42, 'x'), /service name must be a string/)
    await assert.rejects(mesh.call('echo', 42), /payload must be a Buffer/)
    await assert.rejects(mesh.call('echo', 'x', { timeout: 5 }), /unknown option 'timeout'/)
    await assert.rejects(mesh.call('echo', 'x', { timeoutMs: -1 }), /timeoutMs must be/)
    await rejectsWith(mesh.call('no spaces allowed', 'x'), 'INVALID_ARGUMENT')
    await assert.rejects(mesh.serve('echo', 'not a function'), /handler must be a function/)
    await assert.rejects(Mesh.open({ mesh: 'x', colour: 'blue' }), /unknown option 'colour'/)
    await assert.rejects(Mesh.open({ runtimeDir: '/proc/definitely/not/here' }), CommyError)
    await assert.rejects(Mesh.open({ mesh: 'bad name!' }), (e) => e.code === 'INVALID_ARGUMENT')
  }))

test('every setting is an option by its key, and each value says where it came from', async () => {
  process.env.COMMY_MAX_CONCURRENCY = '7'
  try {
    const mesh = await Mesh.open({ runtimeDir: runtimeDir(), transport: 'shm', defaultTimeoutMs: 1500 })
    try {
      assert.deepEqual(mesh.explain('transport'), ['"shm"', 'Node options'])
      assert.deepEqual(mesh.explain('defaultTimeoutMs'), ['"1500ms"', 'Node options'])
      assert.deepEqual(mesh.explain('default_timeout'), ['"1500ms"', 'Node options'])
      assert.deepEqual(mesh.explain('maxConcurrency'), ['7', '$COMMY_MAX_CONCURRENCY'])
      assert.deepEqual(mesh.explain('requireClientCert'), ['false', 'default'])
      assert.equal(mesh.explain('colour'), null)
    } finally {
      await mesh.close()
    }
  } finally {
    delete process.env.COMMY_MAX_CONCURRENCY
  }
  await rejectsWith(Mesh.open({ runtimeDir: runtimeDir(), maxConcurrency: 0 }), 'INVALID_ARGUMENT', /max_concurrency \(Node options\)/)
  await rejectsWith(Mesh.open({ runtimeDir: runtimeDir(), transport: 'pigeon' }), 'INVALID_ARGUMENT', /transport/)
  await assert.rejects(Mesh.open({ peers: [1, 2] }), /options.peers must be/)
})

test('idempotent calls go around a failing instance; ejection and retries are options', async () => {
  const dir = runtimeDir()
  const failing = await Mesh.open({ runtimeDir: dir })
  const working = await Mesh.open({ runtimeDir: dir })
  await failing.serve('flaky', () => {
    throw new CommyError('UNAVAILABLE', 'this instance fails on purpose')
  })
  await working.serve('flaky', () => 'ok')
  try {
    const client = await Mesh.open({ runtimeDir: dir, idempotent: ['flaky'], ejectAfter: 0, ejectSuccessPercent: 0, ejectionTimeMs: 500 })
    try {
      assert.deepEqual(client.explain('idempotent'), ['["flaky"]', 'Node options'])
      assert.deepEqual(client.explain('ejectionTimeMs'), ['"500ms"', 'Node options'])
      // Each call that reaches the failing instance is tried again on the other.
      for (let i = 0; i < 50; i++) {
        assert.equal((await client.call('flaky', '')).toString(), 'ok')
      }
    } finally {
      await client.close()
    }
    const plain = await Mesh.open({ runtimeDir: dir })
    try {
      let failures = 0
      for (let i = 0; i < 50; i++) {
        await plain.call('flaky', '').catch((e) => {
          assert.equal(e.code, 'UNAVAILABLE')
          failures++
        })
      }
      // Not idempotent: at most the five failures that eject it.
      assert.ok(failures >= 1 && failures <= 5, `${failures} failures`)
      // Marked idempotent per call: retried on the working one.
      for (let i = 0; i < 20; i++) {
        assert.equal((await plain.call('flaky', '', { idempotent: true })).toString(), 'ok')
      }
      await assert.rejects(plain.call('flaky', '', { idempotent: 'yes' }), /idempotent must be a boolean/)
      const endpoints = plain.endpoints('flaky')
      const states = endpoints.map((e) => e.state).sort()
      assert.deepEqual(states, failures === 5 ? ['ejected', 'in'] : ['in', 'in'])
      for (const e of endpoints) {
        assert.ok(e.linked && e.inFlight === 0 && e.roundTripMs == null, JSON.stringify(e))
        if (e.state === 'ejected') {
          assert.equal(e.failedCalls, 5)
          assert.equal(e.ejections, 1)
          assert.ok(e.ejectedForMs > 0 && e.ejectedForMs <= 30_000)
        }
      }
      assert.throws(() => plain.endpoints('no spaces'), (e) => e.code === 'INVALID_ARGUMENT')
    } finally {
      await plain.close()
    }
  } finally {
    await failing.close()
    await working.close()
  }
  await rejectsWith(Mesh.open({ runtimeDir: dir, maxEjectedPercent: 101 }), 'INVALID_ARGUMENT', /max_ejected_percent/)
  await rejectsWith(Mesh.open({ runtimeDir: dir, idempotent: ['no spaces'] }), 'INVALID_ARGUMENT', /idempotent/)
})

test('hedged calls go around a stalling instance', async () => {
  const dir = runtimeDir()
  const stalling = await Mesh.open({ runtimeDir: dir })
  const working = await Mesh.open({ runtimeDir: dir })
  let stall = false
  await stalling.serve('slow', () => (stall ? new Promise((resolve) => setTimeout(() => resolve('late'), 1000)) : 'late'))
  await working.serve('slow', () => 'ok')
  try {
    const client = await Mesh.open({ runtimeDir: dir, idempotent: ['slow'], hedge: ['slow=5ms'], retryBudgetPercent: 100 })
    try {
      assert.deepEqual(client.explain('hedge'), ['["slow=5ms"]', 'Node options'])
      // Linked to both first: a hedge goes to an instance other than the
      // first attempt's once that one is linked.
      const seen = new Set()
      while (seen.size < 2) seen.add((await client.call('slow', '')).toString())
      stall = true
      // A call that went to the stalling instance went to the other 5 ms
      // later, whose answer came first.
      for (let i = 0; i < 10; i++) {
        assert.equal((await client.call('slow', '')).toString(), 'ok')
      }
    } finally {
      await client.close()
    }
  } finally {
    await stalling.close()
    await working.close()
  }
  await rejectsWith(Mesh.open({ runtimeDir: dir, hedge: ['slow=soon'] }), 'INVALID_ARGUMENT', /hedge/)
})

test('a hash key keeps calls on one instance, from every handle', async () => {
  const dir = runtimeDir()
  const servers = []
  for (let i = 0; i < 3; i++) {
    const server = await Mesh.open({ runtimeDir: dir })
    await server.serve('shard', () => Buffer.from([i]))
    servers.push(server)
  }
  const a = await Mesh.open({ runtimeDir: dir, balance: ['shard=maglev'] })
  const b = await Mesh.open({ runtimeDir: dir, balance: ['maglev'] })
  try {
    const owners = new Set()
    for (let n = 0; n < 30; n++) {
      const key = `user-${n}`
      const first = (await a.call('shard', '', { hashKey: key }))[0]
      for (let k = 0; k < 3; k++) {
        assert.equal((await a.call('shard', '', { hashKey: key }))[0], first)
      }
      // Another handle (another process, another SDK) agrees.
      assert.equal((await b.call('shard', '', { hashKey: Buffer.from(key) }))[0], first)
      owners.add(first)
    }
    assert.equal(owners.size, 3)
    await assert.rejects(a.call('shard', '', { hashKey: 42 }), /hashKey/)
  } finally {
    await a.close()
    await b.close()
    for (const s of servers) await s.close()
  }
  await rejectsWith(Mesh.open({ runtimeDir: dir, balance: ['shard=random'] }), 'INVALID_ARGUMENT', /unknown strategy/)
})

test('a rolling restart fails no call: a closed service drains', async () => {
  const dir = runtimeDir()
  const servers = []
  const services = []
  for (let i = 0; i < 3; i++) {
    const server = await Mesh.open({ runtimeDir: dir })
    servers.push(server)
    services.push(await server.serve('echo', (r) => r))
  }
  const clients = []
  for (let i = 0; i < 4; i++) clients.push(await Mesh.open({ runtimeDir: dir }))
  let stop = false
  const failures = []
  const answered = clients.map(async (client, n) => {
    let count = 0
    while (!stop) {
      const msg = Buffer.from([n, count % 251])
      try {
        assert.deepEqual(await client.call('echo', msg), msg)
        count++
      } catch (e) {
        failures.push(String(e))
      }
    }
    return count
  })
  try {
    await new Promise((r) => setTimeout(r, 300))
    for (let i = 0; i < 3; i++) {
      await services[i].close() // drains: no call of a client fails
      services[i] = await servers[i].serve('echo', (r) => r)
      await new Promise((r) => setTimeout(r, 200))
    }
  } finally {
    stop = true
  }
  const counts = await Promise.all(answered)
  for (const c of clients) await c.close()
  for (const s of servers) await s.close()
  assert.deepEqual(failures, [])
  assert.ok(counts.every((n) => n > 50), String(counts))
})

test('a closed mesh refuses work and close is idempotent', async () => {
  const mesh = await Mesh.open({ runtimeDir: runtimeDir() })
  await mesh.close()
  await mesh.close()
  await rejectsWith(mesh.call('echo', 'x'), 'FAILED_PRECONDITION')
  await rejectsWith(mesh.serve('echo', (r) => r), 'FAILED_PRECONDITION')
  await rejectsWith(mesh.publish('t', 'x'), 'FAILED_PRECONDITION')
})

test('closing waits for requests in progress, and a closed service is gone', () =>
  withMesh(async (mesh) => {
    let release, started
    const gate = new Promise((r) => (release = r))
    const inHandler = new Promise((r) => (started = r))
    const svc = await mesh.serve('slow', async () => {
      started()
      await gate
      return 'done'
    })
    assert.equal(svc.name, 'slow')
    const answer = mesh.call('slow', 'x')
    await inHandler
    let closed = false
    const closing = svc.close().then(() => (closed = true))
    // Closing waits for the request in progress.
    await new Promise((r) => setImmediate(r))
    assert.equal(closed, false)
    release()
    assert.equal((await answer).toString(), 'done')
    await closing
    await rejectsWith(mesh.call('slow', 'x'), 'NOT_FOUND')
    // A request whose caller gave up does not hold closing up.
    const stuck = await mesh.serve('stuck', () => new Promise(() => {}))
    await rejectsWith(mesh.call('stuck', 'x', { timeoutMs: 50 }), 'DEADLINE_EXCEEDED')
    await stuck.close()
  }))

test('maxConcurrency bounds the handlers in progress; the calls past it wait their turn', async () => {
  const bound = 2
  const mesh = await Mesh.open({ runtimeDir: runtimeDir(), maxConcurrency: bound })
  try {
    let running = 0
    let peak = 0
    const gates = []
    await mesh.serve('bounded', async (req) => {
      running++
      peak = Math.max(peak, running)
      await new Promise((r) => gates.push(r))
      running--
      return req
    })
    const calls = Array.from({ length: 6 }, (_, i) => mesh.call('bounded', `call ${i}`))
    const answered = []
    calls.forEach((c) => c.then((r) => answered.push(r.toString())))
    // Open the gates one at a time as handlers come in.
    const started = Date.now()
    while (answered.length < calls.length) {
      assert.ok(Date.now() - started < 10_000, `only ${answered.length} of ${calls.length} calls answered`)
      await new Promise((r) => setTimeout(r, 20))
      assert.ok(running <= bound, `${running} handlers ran at once`)
      gates.shift()?.()
    }
    assert.equal(peak, bound)
    assert.deepEqual(answered.sort(), calls.map((_, i) => `call ${i}`).sort())
  } finally {
    await mesh.close()
  }
})

test('send delivers a one-way message', () =>
  withMesh(async (mesh) => {
    let got
    const arrived = new Promise((r) => (got = r))
    await mesh.serve('inbox', (req) => got(req.toString()))
    await mesh.send('inbox', 'note')
    assert.equal(await arrived, 'note')
  }))

test('subscriptions are async iterables; close ends a waiting loop', () =>
  withMesh(async (mesh) => {
    const sub = await mesh.subscribe('news')
    assert.equal(sub.topic, 'news')
    const n = 600 // more than the credit window, so credit must flow back
    const got = []
    const reading = (async () => {
      for await (const msg of sub) {
        got.push(msg.toString())
        if (got.length === n) break
      }
    })()
    for (let i = 0; i < n; i++) assert.equal(await mesh.publish('news', `m${i}`), 1)
    await reading
    assert.deepEqual(got, Array.from({ length: n }, (_, i) => `m${i}`))
    // Leaving the loop closed it: nothing more comes out of it.
    await mesh.publish('news', 'late')
    assert.deepEqual(await sub.next(), { value: undefined, done: true })

    const sub2 = await mesh.subscribe('quiet')
    const waiting = sub2.next()
    sub2.close()
    assert.deepEqual(await waiting, { value: undefined, done: true })
  }))

test('a queue group gives each message to one member', () =>
  withMesh(async (mesh) => {
    const a = await mesh.subscribe('jobs', { group: 'workers' })
    const b = await mesh.subscribe('jobs', { group: 'workers' })
    assert.equal(a.group, 'workers')
    const n = 20
    for (let i = 0; i < n; i++) assert.equal(await mesh.publish('jobs', String(i)), 1)
    const seen = []
    let all
    const gotAll = new Promise((r) => (all = r))
    const read = async (sub) => {
      for await (const msg of sub) {
        seen.push(Number(msg.toString()))
        if (seen.length === n) all()
      }
    }
    const readers = [read(a), read(b)]
    await gotAll
    a.close()
    b.close()
    await Promise.all(readers)
    assert.deepEqual(seen.sort((x, y) => x - y), Array.from({ length: n }, (_, i) => i))
  }))

test('waitForSubscribers counts what a publish would reach; tryNext does not wait', () =>
  withMesh(async (mesh) => {
    await rejectsWith(mesh.waitForSubscribers('counted', 1, { timeoutMs: 50 }), 'DEADLINE_EXCEEDED', /0 of 1 subscribers/)
    await rejectsWith(mesh.waitForSubscribers('counted', -1), 'INVALID_ARGUMENT', /n must be/)
    const sub = await mesh.subscribe('counted')
    const members = [await mesh.subscribe('counted', { group: 'workers' }), await mesh.subscribe('counted', { group: 'workers' })]
    assert.equal(await mesh.waitForSubscribers('counted', 2), 2)
    assert.equal(await mesh.subscribers('counted'), 2)
    assert.equal(sub.tryNext(), undefined)
    assert.equal(await mesh.publish('counted', 'm'), 2)
    // Polled without waiting until it is there (bounded, so a message
    // that never comes fails the test instead of holding it).
    let got
    const until = Date.now() + 20_000
    while ((got = sub.tryNext()) === undefined) {
      assert.ok(Date.now() < until, 'the published message never reached tryNext')
      await new Promise((r) => setTimeout(r, 1))
    }
    assert.equal(got.toString(), 'm')
    assert.equal(sub.tryNext(), undefined)
    for (const s of [sub, ...members]) s.close()
    assert.equal(sub.tryNext(), undefined)
  }))

test('publishMany publishes a burst in order and names a bad payload', () =>
  withMesh(async (mesh) => {
    const sub = await mesh.subscribe('burst')
    assert.equal(await mesh.waitForSubscribers('burst', 1), 1)
    assert.equal(await mesh.publishMany('burst', ['a', Buffer.from('b'), new Uint8Array([99])]), 3)
    const more = Array.from({ length: 100 }, (_, i) => `m${i}`)
    assert.equal(await mesh.publishMany('burst', new Set(more)), 100)
    assert.equal(await mesh.publishMany('burst', []), 0)
    await assert.rejects(mesh.publishMany('burst', ['x', 42]), /payload 1 must be a Buffer/)
    await assert.rejects(mesh.publishMany('burst', 'abc'), /payloads must be an array/)
    await assert.rejects(mesh.publishMany('burst', Buffer.from('abc')), /payloads must be an array/)
    const got = []
    for await (const msg of sub) {
      got.push(msg.toString())
      if (got.length === 103) break
    }
    assert.deepEqual(got, ['a', 'b', 'c', ...more])
  }))

test('a publisher publishes on its topic, in order, and refuses bad input', () =>
  withMesh(async (mesh) => {
    const ticks = mesh.publisher('ticks')
    assert.ok(ticks instanceof Publisher)
    assert.equal(ticks.topic, 'ticks')
    assert.equal(await ticks.publish('nobody'), 0)
    const sub = await mesh.subscribe('ticks', { lingerUs: 0 })
    assert.equal(await mesh.waitForSubscribers('ticks', 1), 1)
    // Publishes started in one turn keep their order.
    const sent = Array.from({ length: 200 }, (_, i) => `t${i}`)
    const counts = await Promise.all(sent.map((m) => ticks.publish(m)))
    assert.deepEqual(counts, sent.map(() => 1))
    assert.equal(await ticks.publishMany(['x', Buffer.from('y'), new Uint8Array([122])]), 3)
    await assert.rejects(ticks.publish(42), /the payload must be a Buffer/)
    await assert.rejects(ticks.publishMany(['x', 42]), /payload 1 must be a Buffer/)
    assert.throws(() => mesh.publisher('bad topic'), (e) => e instanceof CommyError && e.code === 'INVALID_ARGUMENT')
    const got = []
    for await (const msg of sub) {
      got.push(msg.toString())
      if (got.length === 203) break
    }
    assert.deepEqual(got, [...sent, 'x', 'y', 'z'])
    await mesh.close()
    await rejectsWith(ticks.publish('late'), 'FAILED_PRECONDITION', /closed/)
  }))

test('slow-subscriber policies count their losses on both sides', () =>
  withMesh(async (mesh) => {
    const N = 3000
    const dropping = await mesh.subscribe('slow', { queue: 8, policy: 'drop-oldest' })
    const ending = await mesh.subscribe('slow', { queue: 4, policy: 'disconnect' })
    assert.equal(await mesh.waitForSubscribers('slow', 2), 2)
    assert.equal(dropping.dropped, 0)
    assert.equal(dropping.endReason, null)
    for (let i = 0; i < N; i++) await mesh.publish('slow', `${i}`)
    // Messages reach the queue on the subscription's own thread.
    let received = 0
    const deadline = Date.now() + 30_000
    while (received + dropping.dropped < N) {
      assert.ok(Date.now() < deadline, `${received} received, ${dropping.dropped} dropped`)
      if (dropping.tryNext() === undefined) await new Promise((r) => setTimeout(r, 1))
      else received++
    }
    assert.ok(dropping.dropped > 0)
    assert.equal(mesh.droppedBySubscribers('slow'), dropping.dropped)
    assert.equal(dropping.endReason, null)
    // Disconnect: the subscription ends once its queue was full, and says why.
    while (ending.endReason === null) {
      assert.ok(Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 1))
    }
    assert.ok(ending.endReason instanceof CommyError)
    assert.equal(ending.endReason.code, 'RESOURCE_EXHAUSTED')
    assert.match(ending.endReason.message, /queue of 4 was full/)
    assert.ok(ending.dropped >= 1)
    ending.close()
    assert.equal(ending.endReason.code, 'RESOURCE_EXHAUSTED', 'kept after close')
    await assert.rejects(mesh.subscribe('slow', { policy: 'fast' }), (e) => {
      assert.ok(e instanceof CommyError)
      assert.equal(e.code, 'INVALID_ARGUMENT')
      assert.match(e.message, /unknown slow-subscriber policy "fast"/)
      return true
    })
    await assert.rejects(mesh.subscribe('slow', { queue: 0 }), /options.queue must be a positive integer/)
    await assert.rejects(mesh.subscribe('slow', { queue: 2 ** 21 }), /1 to 1048576 messages/)
    await assert.rejects(mesh.subscribe('slow', { lingerUs: -1 }), /options.lingerUs must be a finite number/)
    await assert.rejects(mesh.subscribe('slow', { lingerUs: 500 }), (e) => {
      assert.equal(e.code, 'INVALID_ARGUMENT')
      assert.match(e.message, /linger must be at most 100/)
      return true
    })
    assert.throws(() => mesh.droppedBySubscribers('bad topic'), (e) => e instanceof CommyError && e.code === 'INVALID_ARGUMENT')
  }))

test('callMany gives each call its reply or error, in order', () =>
  withMesh(async (mesh) => {
    await mesh.serve('echo', (req) => req)
    await mesh.serve('picky', (req) => {
      if (req.toString() === 'no') throw new CommyError('PERMISSION_DENIED', 'not this one')
      return req
    })
    const requests = Array.from({ length: 1000 }, (_, i) => `${i}`)
    const answers = await mesh.callMany('echo', requests)
    assert.deepEqual(answers.map((b) => b.toString()), requests)
    assert.deepEqual(await mesh.callMany('echo', []), [])
    const mixed = await mesh.callMany('picky', ['a', 'no', 'b'])
    assert.equal(mixed[0].toString(), 'a')
    assert.ok(mixed[1] instanceof CommyError)
    assert.equal(mixed[1].code, 'PERMISSION_DENIED')
    assert.equal(mixed[2].toString(), 'b')
    await assert.rejects(mesh.callMany('echo', 'abc'), TypeError)
  }))

test('nextBatch takes what has come, in order', () =>
  withMesh(async (mesh) => {
    const sub = await mesh.subscribe('batched')
    assert.equal(await mesh.waitForSubscribers('batched', 1), 1)
    const all = Array.from({ length: 500 }, (_, i) => `${i}`)
    assert.equal(await mesh.publishMany('batched', all), 500)
    const got = []
    while (got.length < 500) {
      const batch = await sub.nextBatch(64)
      assert.ok(batch.length >= 1 && batch.length <= 64, `a batch of ${batch.length}`)
      got.push(...batch.map((b) => b.toString()))
    }
    assert.deepEqual(got, all)
    await assert.rejects(sub.nextBatch(0), /max must be a positive integer/)
    sub.close()
    assert.deepEqual(await sub.nextBatch(), [])
  }))

test('regions are shared memory with copying read and write', () =>
  withMesh(async (mesh) => {
    const r = mesh.region('scratch', { size: 64 })
    assert.equal(r.name, 'scratch')
    assert.equal(r.size, 64)
    r.write('hello', 10)
    const again = mesh.region('scratch', { size: 64 })
    assert.equal(again.read(10, 5).toString(), 'hello')
    assert.equal(again.read().length, 64)
    assert.throws(() => again.read(60, 10), (e) => e instanceof CommyError && e.code === 'INVALID_ARGUMENT')
    assert.throws(() => mesh.region('scratch', { create: 'create', size: 64 }), (e) => e.code === 'ALREADY_EXISTS')
    assert.throws(() => mesh.region('missing'), (e) => e.code === 'NOT_FOUND')
    assert.throws(() => mesh.region('x', { size: -1 }), /size must be a positive integer/)
    assert.throws(() => again.read(-1, 2), (e) => e instanceof CommyError && e.code === 'INVALID_ARGUMENT')
    again.close()
    r.close()
    assert.throws(() => r.read(), (e) => e.code === 'FAILED_PRECONDITION')
  }))
