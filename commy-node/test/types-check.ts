// Compiled with `tsc --noEmit --strict` by the test step: the committed
// index.d.ts must type the documented API.
import { CommyError, Mesh, Publisher, type Code, codes } from '@commy/node'

async function main(): Promise<void> {
  const mesh: Mesh = await Mesh.open({ mesh: 'types', defaultTimeoutMs: 1000 })
  const svc = await mesh.serve('echo', async (req: Buffer) => req)
  await mesh.serve('whoami', (req, { caller, signal }) => {
    const kind: 'local' | 'remote' | 'unknown' = caller.kind
    const uid: number | null = caller.uid
    const identity: string | null = caller.identity
    void signal.aborted
    return `${kind} ${uid ?? caller.addr} ${identity}`
  })
  const reply: Buffer = await mesh.call('echo', Buffer.from('hi'), { timeoutMs: 1000 })
  const again: Buffer = await mesh.call('echo', 'hi', { idempotent: true, hashKey: 'user-1' })
  const states: Array<'in' | 'ejected' | 'half-open'> = mesh.endpoints('echo').map((e) => e.state)
  void again
  void states
  const n: number = await mesh.publish('t', 'x')
  const burst: number = await mesh.publishMany('t', ['x', Buffer.from('y'), new Uint8Array(1)])
  const ticks: Publisher = mesh.publisher('t')
  const topic: string = ticks.topic
  const one: number = await ticks.publish(Buffer.from(topic))
  const some: number = await ticks.publishMany(['x', new Uint8Array(1)])
  await mesh.send('echo', new Uint8Array([1]))
  const sub = await mesh.subscribe('t', { group: 'g', lingerUs: 2 })
  for await (const msg of sub) {
    const b: Buffer = msg
    void b
    break
  }
  const slow = await mesh.subscribe('t', { queue: 16, policy: 'drop-oldest' })
  const lost: number = slow.dropped + mesh.droppedBySubscribers('t')
  const why: CommyError | null = slow.endReason
  const batch: Buffer[] = await slow.nextBatch(32)
  const answers: Array<Buffer | CommyError> = await mesh.callMany('echo', ['a', Buffer.from('b')])
  void answers
  void batch
  void lost
  void why
  const region = mesh.region('r', { size: 64, create: 'openOrCreate' })
  region.write('abc', 1)
  const data: Buffer = region.read(0, 4)
  region.close()
  await svc.close()
  await mesh.close()
  try {
    await mesh.call('x', 'y')
  } catch (e) {
    if (e instanceof CommyError) {
      const code: Code = e.code
      void code
    }
  }
  void reply, n, data, codes
}
void main
